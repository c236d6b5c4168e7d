/** What the panel checks before the server sees it: the Scale dialog's fields, the default fraction. */
import { scaleRequest, validFraction } from '../validate';

describe('scaleRequest', () => {
  it('builds the api/scale body the server accepts', () => {
    expect(scaleRequest('manual', { n: '3' })).toEqual({ body: { n: 3 } });
    expect(scaleRequest('adaptive', { minimum: '1', maximum: '4' })).toEqual({ body: { minimum: 1, maximum: 4 } });
  });
  it('refuses what the server would refuse, with a reason', () => {
    expect(scaleRequest('manual', { n: '' })).toHaveProperty('error');
    expect(scaleRequest('manual', { n: '1.5' })).toHaveProperty('error');
    expect(scaleRequest('manual', { n: '-1' })).toHaveProperty('error');
    expect(scaleRequest('adaptive', { minimum: '4', maximum: '1' })).toEqual({
      error: 'Minimum (4) must not exceed maximum (1)'
    });
  });
});

describe('validFraction', () => {
  it('accepts fractions in (0, 1] and whole GPU counts', () => {
    expect(validFraction(0.25)).toBe(0.25);
    expect(validFraction(2)).toBe(2);
    expect(validFraction(0)).toBeNull();
    expect(validFraction(1.5)).toBeNull();
    expect(validFraction('0.5')).toBeNull();
  });
});
