/** How numbers, durations, sparklines and notebook names read in the panel. */
import { formatBytes, formatDuration, notebookLabel, sparklinePoints, whereLabel } from '../format';
import { GiB } from './fixtures';

describe('formatBytes', () => {
  it('uses binary units like the Python side', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(16 * GiB)).toBe('16.0 GiB');
    expect(formatBytes(3 * 1024 * GiB)).toBe('3.0 TiB');
    expect(formatBytes(5000 * 1024 * GiB)).toBe('5000.0 TiB');
  });
  it('says ? when unknown', () => {
    expect(formatBytes(null)).toBe('?');
    expect(formatBytes(undefined)).toBe('?');
    expect(formatBytes(NaN)).toBe('?');
  });
});

describe('formatDuration', () => {
  it('reads well at every scale', () => {
    expect(formatDuration(0)).toBe('0s');
    expect(formatDuration(42.9)).toBe('42s');
    expect(formatDuration(185)).toBe('3m 05s');
    expect(formatDuration(2 * 3600 + 7 * 60 + 3)).toBe('2h 07m');
    expect(formatDuration(-5)).toBe('0s');
    expect(formatDuration(null)).toBe('–');
  });
});

describe('sparklinePoints', () => {
  it('scales to the box with a fixed max and clips above it', () => {
    expect(sparklinePoints([0, 50, 200], 100, 10, 100)).toBe('0.0,10.0 50.0,5.0 100.0,0.0');
  });
  it('draws nothing for fewer than two points', () => {
    expect(sparklinePoints([3], 100, 10)).toBe('');
    expect(sparklinePoints([], 100, 10)).toBe('');
  });
});

describe('notebookLabel', () => {
  it('shows the file name of an absolute path and leaves server paths alone', () => {
    expect(notebookLabel('/home/ann/projects/train.ipynb')).toBe('train.ipynb');
    expect(notebookLabel('C:\\Users\\ann\\train.ipynb')).toBe('train.ipynb');
    expect(notebookLabel('work/train.ipynb')).toBe('work/train.ipynb');
    expect(notebookLabel(null)).toBeNull();
  });
});

describe('whereLabel', () => {
  it('names the notebook and the cell, falling back to an id', () => {
    expect(whereLabel('/home/ann/train.ipynb', 'fit', 'L1')).toBe('train.ipynb › fit');
    expect(whereLabel('work/train.ipynb', null, 'L1')).toBe('work/train.ipynb');
    expect(whereLabel(null, 'fit', 'L1')).toBe('L1 › fit');
    expect(whereLabel(null, null, 'L1')).toBe('L1');
  });
});
