/** The Quotas section: teams' rows and bars, my team and my own standing, the token warning. */
import { buildViewModel } from '../views/viewmodel';
import { myQuotaText, myTeamOf, quotaView, teamQuotaRow, teamQuotaRows } from '../views/quotas';
import { MiB, quotas, snapshot } from './fixtures';

describe('quotas', () => {
  it('finds my team where the broker lists me (members too), else the default team', () => {
    const q = quotas();
    expect(myTeamOf(q, 'alice')).toBe('ml');
    expect(myTeamOf(q, 'carol')).toBe('viz'); // a member: the broker lists members under users too
    expect(myTeamOf(q, 'dave')).toBe('default');
  });

  it('draws held within the guarantee, the borrowed rest, and the guarantee tick on the limit scale', () => {
    const row = teamQuotaRow(quotas().teams![1], true);
    expect(row.text).toBe('1.5 of 1 GPU guaranteed · limit 2');
    expect([row.withinShare, row.overShare, row.guaranteeAt]).toEqual([0.5, 0.25, 0.5]);
    expect(row.over).toBe(true);
    expect(row.members).toEqual(['alice', 'bob']);
  });

  it('scales a team without a limit by the larger of its guarantee and what it holds', () => {
    const within = teamQuotaRow({ team: 't', guarantee: 2, held: 1 }, false);
    expect([within.withinShare, within.overShare, within.guaranteeAt, within.over]).toEqual([0.5, 0, 1, false]);
    const over = teamQuotaRow({ team: 't', guarantee: 1, held: 2 }, false);
    expect([over.withinShare, over.overShare, over.guaranteeAt, over.over]).toEqual([0.5, 0.5, 0.5, true]);
    const empty = teamQuotaRow({ team: 't', guarantee: 0, held: 0 }, false);
    expect([empty.withinShare, empty.overShare, empty.over]).toEqual([0, 0, false]);
  });

  it('lists my team first and leaves out an empty default team unless it is mine', () => {
    expect(teamQuotaRows(quotas(), 'carol').map(r => [r.team, r.mine])).toEqual([
      ['viz', true],
      ['ml', false]
    ]);
    expect(teamQuotaRows(quotas(), 'dave').map(r => [r.team, r.mine])).toEqual([
      ['default', true],
      ['ml', false],
      ['viz', false]
    ]);
  });

  it('gives my own held and limit, falling back to my leases when the broker does not list me', () => {
    const alice = quotaView(quotas(), 'alice', 9)!;
    expect([alice.configured, alice.myTeam, alice.myHeld, alice.myLimit, alice.identity]).toEqual([
      true,
      'ml',
      0.25,
      1,
      'tokens'
    ]);
    expect(myQuotaText(alice)).toBe('0.25 GPU held · your limit 1 GPU');
    const carol = quotaView(quotas(), 'carol', 0)!;
    expect(myQuotaText(carol)).toBe('0 GPU held · no limit of your own');
  });

  it("counts my idle sessions' copies in host memory in my line", () => {
    const q = quotas();
    q.users = (q.users ?? []).map(u => (u.user === 'alice' ? { ...u, parked_bytes: 64 * MiB } : u));
    expect(myQuotaText(quotaView(q, 'alice', 0)!)).toBe(
      '0.25 GPU held · your limit 1 GPU · 64.0 MiB of idle sessions in host memory'
    );
  });

  it('warns when the pool checks tokens and this server has none to send', () => {
    const snap = snapshot() as any;
    snap.quotas = quotas();
    expect(buildViewModel(snap, 0).tokenMissing).toBe(false); // no token_set: an older server, say nothing
    snap.token_set = false;
    expect(buildViewModel(snap, 0).tokenMissing).toBe(true);
    snap.token_set = true;
    expect(buildViewModel(snap, 0).tokenMissing).toBe(false);
    snap.token_set = false;
    snap.quotas.identity = 'names';
    expect(buildViewModel(snap, 0).tokenMissing).toBe(false);
  });

  it('says so when a shared pool does not isolate its users (and nothing for the embedded pool)', () => {
    const snap = snapshot() as any;
    snap.pool = { ...snap.pool, embedded: false, shared: true, users_isolated: false };
    expect(buildViewModel(snap, 0).notIsolated).toBe(true);
    snap.pool.users_isolated = true;
    expect(buildViewModel(snap, 0).notIsolated).toBe(false);
    snap.pool = { ...snap.pool, users_isolated: false, shared: false }; // no tokens: one trusted group
    expect(buildViewModel(snap, 0).notIsolated).toBe(false);
    snap.pool = { ...snap.pool, shared: true, embedded: true };
    expect(buildViewModel(snap, 0).notIsolated).toBe(false);
  });

  it('says not configured for a pool without a quota file, and nothing for a broker without quotas', () => {
    const none = quotaView({ configured: false, teams: [] }, 'alice', 0.5)!;
    expect([none.configured, none.teams]).toEqual([false, []]);
    expect(quotaView(undefined, 'alice', 0)).toBeNull();
  });

  it('reaches the view model with right-sizing and preemptible sessions', () => {
    const snap = snapshot() as any;
    snap.quotas = quotas();
    snap.gpus[0].leases[1].peak_bytes = 512 * MiB; // alice's L1 reserves 4 GiB
    // the broker's hint for it (broker/views.py right_size_hint; the rule is tested in tests/unit/test_views.py)
    snap.gpus[0].leases[1].right_size = 'used 512.0 MiB of 4.0 GiB: ask --memory 1GiB next time';
    snap.gpus[0].leases[1].preemptible = true;
    const vm = buildViewModel(snap, 0);
    expect(vm.quotas!.teams[0]).toMatchObject({ team: 'ml', mine: true, over: true });
    const l1 = vm.sessions.find(s => s.id === 'L1')!;
    expect(l1.usage).toBe('peak 512.0 MiB of 4.0 GiB reserved');
    expect(l1.rightSize).toBe('used 512.0 MiB of 4.0 GiB: ask --memory 1GiB next time');
    expect(l1.preemptible).toBe(true);
    expect(vm.gpus[0].segments.find(s => s.leaseId === 'L1')!.preemptible).toBe(true);
    // the two-GPU lease gets no --memory suggestion (it sizes one GPU's share)
    const l3 = vm.sessions.find(s => s.id === 'L3')!;
    expect([l3.usage, l3.rightSize, l3.preemptible]).toEqual(['32.0 GiB reserved', null, false]);
  });
});
