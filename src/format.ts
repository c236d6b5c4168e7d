/**
 * How numbers, durations and names read in the panel. Pure string functions with no knowledge of the pool:
 * the view builders (src/views/) and the components call them, and jest tests pin their output
 * (src/__tests__/format.spec.ts), because the panel's text is compared with the notebook's and the CLI's.
 */

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** Bytes in binary units, the same form the Python side prints (``16.0 GiB``, ``512 B``). */
export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !isFinite(n)) {
    return '?';
  }
  let value = n;
  for (const unit of UNITS) {
    if (Math.abs(value) < 1024 || unit === 'TiB') {
      return unit === 'B' ? `${Math.round(value)} B` : `${value.toFixed(1)} ${unit}`;
    }
    value /= 1024;
  }
  return `${value.toFixed(1)} TiB`;
}

/** A duration in seconds as people read it in a narrow panel: ``42s``, ``3m 05s``, ``2h 07m``. */
export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return '–';
  }
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `${m}m ${String(s % 60).padStart(2, '0')}s`;
  }
  const h = Math.floor(m / 60);
  return `${h}h ${String(m % 60).padStart(2, '0')}m`;
}

/** A time of day, 24-hour ``14:03:12``, from epoch seconds (the panel's clock, for when things happened). */
export function formatClock(epochSeconds: number): string {
  const d = new Date(epochSeconds * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map(n => String(n).padStart(2, '0')).join(':');
}

/** A GPU fraction as the magic and the quota file spell it: ``0.25``, ``1``, ``2.5``. */
export function formatShare(share: number): string {
  const rounded = Math.round(share * 100) / 100;
  return String(rounded);
}

/**
 * An SVG polyline ``points`` string for a sparkline of ``values`` in a ``width`` x ``height`` box, scaled to
 * ``max`` (values above are clipped). Empty for fewer than two values: a single point draws nothing useful.
 */
export function sparklinePoints(values: number[], width: number, height: number, max?: number): string {
  const finite = values.filter(v => typeof v === 'number' && isFinite(v));
  if (finite.length < 2) {
    return '';
  }
  const top = max !== undefined && max > 0 ? max : Math.max(...finite) || 1;
  const low = max !== undefined ? 0 : Math.min(0, ...finite);
  const span = top - low || 1;
  const step = width / (finite.length - 1);
  return finite
    .map((v, i) => {
      const clipped = Math.min(Math.max(v, low), top);
      const y = height - ((clipped - low) / span) * height;
      return `${(i * step).toFixed(1)},${y.toFixed(1)}`;
    })
    .join(' ');
}

/**
 * How a lease's notebook is shown. This server's kernels are mapped to server paths (notebooks.ts); other
 * kernels report an absolute path on their own machine, which would only be cut off in a narrow panel,
 * so those show their file name (the full path stays in the tooltip).
 */
export function notebookLabel(path: string | null | undefined): string | null {
  if (!path) {
    return null;
  }
  const absolute = path.startsWith('/') || /^[A-Za-z]:[\\/]/.test(path);
  return absolute ? path.split(/[\\/]/).pop() || path : path;
}

/** Where a lease or request runs, as one line: ``train.ipynb › fit`` (the cell only when it has a name). */
export function whereLabel(notebook: string | null, cell: string | null, fallback: string): string {
  return (notebookLabel(notebook) ?? fallback) + (cell ? ` › ${cell}` : '');
}
