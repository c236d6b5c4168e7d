/** Tooltip texts that explain a mark in the panel (why a lease is preemptible, why a smaller ask). */

/** Why a lease is marked preemptible (docs/fair-share.md, "Borrowing and reclaim"). */
export const PREEMPTIBLE_HELP =
  "borrowed: granted beyond its team's guarantee on idle capacity, so the pool may end it (after its " +
  'minimum run time) when another team needs its guarantee back';

/** Why the panel shows the broker's smaller ``--memory`` suggestion. */
export const RIGHT_SIZE_HELP =
  "this session's peak memory is under a quarter of what it reserves: a smaller request starts sooner and " +
  'leaves the rest of the GPU to others';
