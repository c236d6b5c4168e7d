/**
 * What the panel checks before the server sees it: the Scale dialog's fields and the default fraction from
 * the settings or the pool. The server checks again; checking here lets the dialog say what is wrong in
 * words, and keeps a bad setting from reaching the "No GPU pool" hint.
 */

/** The default fraction, validated: a number in (0, 1] or a whole number of GPUs, else null. */
export function validFraction(value: unknown): number | null {
  if (typeof value !== 'number' || !isFinite(value) || value <= 0) {
    return null;
  }
  if (value > 1 && Math.floor(value) !== value) {
    return null;
  }
  return value;
}

/** The fields of the Scale dialog, as typed. */
export interface IScaleFields {
  n?: string;
  minimum?: string;
  maximum?: string;
}

/** The body of POST jupyter-gpu/api/scale: a fixed worker count, or adaptive bounds. */
export type ScaleBody = { n: number } | { minimum: number; maximum: number };

/** The scale request body from the dialog's fields, or an error message for the dialog to show. */
export function scaleRequest(
  mode: 'manual' | 'adaptive',
  fields: IScaleFields
): { body: ScaleBody } | { error: string } {
  const whole = (text: string | undefined, name: string): number | string => {
    const value = Number((text ?? '').trim());
    if ((text ?? '').trim() === '' || !Number.isInteger(value) || value < 0) {
      return `${name} must be a whole number of workers (0 or more)`;
    }
    return value;
  };
  if (mode === 'manual') {
    const n = whole(fields.n, 'Workers');
    return typeof n === 'string' ? { error: n } : { body: { n } };
  }
  const minimum = whole(fields.minimum, 'Minimum');
  if (typeof minimum === 'string') {
    return { error: minimum };
  }
  const maximum = whole(fields.maximum, 'Maximum');
  if (typeof maximum === 'string') {
    return { error: maximum };
  }
  if (minimum > maximum) {
    return { error: `Minimum (${minimum}) must not exceed maximum (${maximum})` };
  }
  return { body: { minimum, maximum } };
}
