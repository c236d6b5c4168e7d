/**
 * My sessions' usage line. The right-sizing rule (``suggestMemory``, ``rightSizeHint``) was tested here while
 * the panel kept a copy of it; the broker now sends the hint (``right_size``), and those cases moved to
 * tests/unit/test_views.py with the rule.
 */
import { mySessions, usageText } from '../views/sessions';
import { GiB, MiB } from './fixtures';

describe('usageText', () => {
  it('says peak of reserved when the peak is known', () => {
    expect(usageText(3 * GiB, 4 * GiB)).toBe('peak 3.0 GiB of 4.0 GiB reserved');
    expect(usageText(null, 4 * GiB)).toBe('4.0 GiB reserved');
  });
});

describe('mySessions', () => {
  it("shows the broker's right-sizing hint as sent, and makes none up", () => {
    const lease = { id: 'L1', user: 'alice', bytes: 4 * GiB, bytes_on_gpu: 4 * GiB, peak_bytes: 512 * MiB };
    const gpu = { id: 'w#0', index: 0, host: 'h', total_bytes: 16 * GiB };
    const hint = 'used 512.0 MiB of 4.0 GiB: ask --memory 1GiB next time';
    const [sent] = mySessions([{ ...gpu, leases: [{ ...lease, right_size: hint }] }], 'alice', 0);
    expect([sent.gpus, sent.usage, sent.rightSize]).toEqual([['0@h'], 'peak 512.0 MiB of 4.0 GiB reserved', hint]);
    const [older] = mySessions([{ ...gpu, leases: [lease] }], 'alice', 0); // an older broker: no right_size
    expect(older.rightSize).toBeNull();
  });

  it('says which sessions hold variables, so that Cancel asks before ending them', () => {
    const gpu = { id: 'w#0', index: 0, host: 'h', total_bytes: 16 * GiB };
    const base = { user: 'alice', bytes: GiB, bytes_on_gpu: GiB };
    const leases = [
      { ...base, id: 'L1', state: 'idle' }, // granted, no cell run yet: nothing to lose
      { ...base, id: 'L2', state: 'idle', peak_bytes: 0 }, // ran a cell
      { ...base, id: 'L3', state: 'running', cell_started: 5 }, // runs one
      { ...base, id: 'L4', state: 'idle', resident_bytes: MiB } // holds memory it made
    ];
    const views = mySessions([{ ...gpu, leases }], 'alice', 10);
    expect(views.map(v => [v.id, v.holdsVariables])).toEqual([
      ['L1', false],
      ['L2', true],
      ['L3', true],
      ['L4', true]
    ]);
  });
});

describe('mySessions for the pool administrator', () => {
  const gpu = { id: 'w#0', index: 0, host: 'h', total_bytes: 16 * GiB };
  const leases = [
    { id: 'L1', user: 'bob', bytes: 4 * GiB, bytes_on_gpu: 4 * GiB },
    { id: 'L2', user: 'alice', bytes: 4 * GiB, bytes_on_gpu: 4 * GiB }
  ];
  it('lists only my sessions for a user', () => {
    expect(mySessions([{ ...gpu, leases }], 'alice', 0).map(s => s.id)).toEqual(['L2']);
  });
  it("lists every user's sessions for an admin, mine first, each with its owner", () => {
    const all = mySessions([{ ...gpu, leases }], 'alice', 0, true);
    expect(all.map(s => [s.id, s.user, s.mine])).toEqual([
      ['L2', 'alice', true],
      ['L1', 'bob', false]
    ]);
  });
});
