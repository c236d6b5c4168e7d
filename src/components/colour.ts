/** Colours of other users' leases: stable per user, so a user's leases read alike across GPU cards. */
import type { CSSProperties } from 'react';

/** A stable, theme-neutral hue per user. */
export function userHue(user: string): number {
  let h = 0;
  for (let i = 0; i < user.length; i++) {
    h = (h * 31 + user.charCodeAt(i)) >>> 0;
  }
  return h % 360;
}

/** The inline colour of a lease's segment or swatch; none for mine, which the CSS gives the brand colour. */
export function leaseColour(user: string, mine: boolean): CSSProperties {
  return mine ? {} : { backgroundColor: `hsl(${userHue(user)}, 55%, 55%)` };
}
