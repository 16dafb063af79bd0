#!/usr/bin/env python3
"""Queueing model of the forwarding benchmark (bench/pd_forwarding.sh, docs/perf/pd.md).

Simulates c prefill instances of one slot each (b_p = 1) under Poisson arrivals of two kinds of
prompts, and counts the requests whose time to first token meets an SLO of
base + per-token x prompt tokens, under the two admission policies the router implements:

- baseline: each request joins, at arrival, the FIFO queue of the prefill with the fewest open
  streams (in service + queued), a random one among equals — `AdmissionPolicy::kBaseline`. With
  --gateways G > 1, requests arrive at G gateways in turn and each gateway counts only the streams
  it opened itself (G gateways that do not share their counts). --ties index breaks ties by the
  lowest index instead (independent gateways then all pick the same prefill).
  --baseline-queues gateway models the router before its baseline queue moved into the prefill:
  each gateway held its own queue per prefill, and a freed slot went to the first gateway to ask.
- on-demand: requests wait at the gateway, first come first served, for whichever prefill frees
  first; one still waiting when its budget (base + per-token x prompt tokens) runs out is dropped
  and counts as a failure — `AdmissionPolicy::kOnDemand`. That is one gateway with instant
  retries. With --gateways G > 1 the model also runs what G gateways do: requests arrive at them
  in turn, each holds its own in deadline order and offers them on arrival and every --tick
  seconds (its own phase), and a freed slot goes to whichever gateway asks first ("on-demand, G
  gateways"); and the same with each prefill's deadline priority (`--deadline-priority-ms` of
  `pdserve instance`: for that long after refusing a request, a free slot is kept for the most
  urgent refused one or its gateway).

The model leaves out the decode, the KV transfer and every overhead; prefill time is linear in
the prompt. It answers "which loads and mixes can separate the two policies at all", not what the
system measures.

  forwarding_sim.py compare [options]   success of both policies at loads A, 2A, 4A, ...
  forwarding_sim.py scan [options]      over many mixes and loads: where on-demand stays >= 99 %,
                                        the worst the baseline does there
"""
import argparse
import bisect
import collections
import heapq
import random


def workload(rate, n, long_share, short_tokens, long_tokens, seed):
    """(arrival s, prompt tokens) of n requests: Poisson arrivals, normal prompt lengths."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        mean, sd = long_tokens if rng.random() < long_share else short_tokens
        out.append((t, max(1, int(rng.gauss(mean, sd)))))
    return out


def baseline(reqs, c, sec_per_token, slo, gateways, ties):
    rng = random.Random(7)
    free = [0.0] * c  # when each prefill's queue drains
    ends = [[collections.deque() for _ in range(c)] for _ in range(gateways)]  # per gateway's view
    ok = 0
    for i, (arrival, tokens) in enumerate(reqs):
        view = ends[i % gateways]
        for q in view:
            while q and q[0] <= arrival:
                q.popleft()
        tie = [rng.random() for _ in range(c)] if ties == "random" else range(c)
        k = min(range(c), key=lambda j: (len(view[j]), tie[j]))
        start = max(arrival, free[k])
        free[k] = start + tokens * sec_per_token
        view[k].append(free[k])
        ok += free[k] - arrival <= slo(tokens)
    return ok / len(reqs)


def baseline_gateway_queues(reqs, c, sec_per_token, slo, gateways, ties, seed=5):
    """The baseline as the router ran it before its queue moved into the prefill: each gateway holds
    its own FIFO queue per prefill, and a freed slot goes to the gateway whose request freed it if
    that one has a request queued for it, else to another gateway's head at random (the first of
    them whose retry tick comes) — not to the request that has waited longest at that prefill."""
    rng = random.Random(seed)
    counts = [[0] * c for _ in range(gateways)]  # each gateway's open streams per prefill
    queues = [[collections.deque() for _ in range(c)] for _ in range(gateways)]
    busy = [None] * c  # the gateway whose request each prefill runs
    events = [(a, 1, i) for i, (a, _) in enumerate(reqs)]
    heapq.heapify(events)
    ok = 0

    def start(k, g, i, now):
        nonlocal ok
        busy[k] = g
        end = now + reqs[i][1] * sec_per_token
        heapq.heappush(events, (end, 0, k))
        ok += end - reqs[i][0] <= slo(reqs[i][1])

    while events:
        now, kind, x = heapq.heappop(events)
        if kind == 1:  # an arrival at gateway x % gateways
            g = x % gateways
            view = counts[g]
            tie = [rng.random() for _ in range(c)] if ties == "random" else range(c)
            k = min(range(c), key=lambda j: (view[j], tie[j]))
            view[k] += 1
            if busy[k] is None and not any(queues[h][k] for h in range(gateways)):
                start(k, g, x, now)
            else:
                queues[g][k].append(x)
            continue
        k, g0 = x, busy[x]  # prefill x finished gateway g0's request
        busy[k] = None
        counts[g0][k] -= 1
        waiting = [h for h in range(gateways) if queues[h][k]]
        if waiting:
            g = g0 if g0 in waiting else rng.choice(waiting)
            start(k, g, queues[g][k].popleft(), now)
    return ok / len(reqs)


def on_demand(reqs, c, sec_per_token, slo, budget):
    free = [0.0] * c
    ok = 0
    for arrival, tokens in reqs:  # FIFO: each takes the prefill that frees first
        k = min(range(c), key=lambda j: free[j])
        start = max(arrival, free[k])
        if start - arrival > budget(tokens):
            continue  # dropped at the gateway
        free[k] = start + tokens * sec_per_token
        ok += free[k] - arrival <= slo(tokens)
    return ok / len(reqs)


def on_demand_gateways(reqs, c, sec_per_token, slo, budget, gateways, tick, priority, seed=3):
    """On-demand admission through `gateways` gateways that retry every `tick` s; `priority`: the
    prefills' deadline-priority window in seconds (0: none)."""
    rng = random.Random(seed)
    tie = 0.002  # kDeadlineTieMs
    free_at = [0.0] * c
    noted = [None] * c  # per prefill: (deadline, last refused at, gateway) of the most urgent refused
    queues = [[] for _ in range(gateways)]
    due = [a + budget(t) for a, t in reqs]
    ok = 0
    events = [(a, 0, i) for i, (a, _) in enumerate(reqs)]
    events += [(rng.random() * tick, 1, g) for g in range(gateways)]
    heapq.heapify(events)
    end = reqs[-1][0] + 100.0

    def offer(now, i, g):  # True/False: placed (meets the SLO or not); None: every prefill refused
        arrival, tokens = reqs[i]
        for k in range(c):  # in a fixed order (the router ranks by its own open streams)
            n = noted[k]
            fresh = n is not None and now - n[1] <= priority
            if free_at[k] > now:  # full: the prefill notes the request (Engine::note_refused_locked)
                if priority > 0 and (not fresh or due[i] < n[0] - tie):
                    noted[k] = (due[i], now, g)
                elif priority > 0 and due[i] <= n[0] + tie:
                    noted[k] = (n[0], now, n[2])  # the noted one again
                continue
            if fresh and n[2] != g and due[i] > n[0] + tie:
                continue  # its one slot is kept for the noted request
            if fresh and (n[2] == g or due[i] >= n[0] - tie):
                noted[k] = None
            free_at[k] = now + tokens * sec_per_token
            return free_at[k] - arrival <= slo(tokens)
        return None

    while events:
        now, kind, x = heapq.heappop(events)
        if now > end:
            break
        if kind == 0:  # an arrival at gateway x % gateways
            g = x % gateways
            placed = None if queues[g] else offer(now, x, g)
            if placed is None:
                bisect.insort(queues[g], (due[x], x))
            else:
                ok += placed
            continue
        q = queues[x]  # gateway x's retry: its requests in deadline order, until one is refused
        while q:
            d, i = q[0]
            if now - reqs[i][0] > budget(reqs[i][1]):
                q.pop(0)  # dropped: budget expired
                continue
            placed = offer(now, i, x)
            if placed is None:
                break
            ok += placed
            q.pop(0)
        heapq.heappush(events, (now + tick, 1, x))
    return ok / len(reqs)


def run(args, rate, long_share, short_tokens, long_tokens, slo_base, slo_per_token):
    def slo(t):
        return slo_base + slo_per_token * t

    def budget(t):  # the SLO less the prefill's own time
        return max(0.0, slo(t) - t * args.sec_per_token)

    reqs = workload(rate, args.n, long_share, short_tokens, long_tokens, args.seed)
    if args.baseline_queues == "gateway":
        b = baseline_gateway_queues(reqs, args.prefills, args.sec_per_token, slo, args.gateways, args.ties)
    else:
        b = baseline(reqs, args.prefills, args.sec_per_token, slo, args.gateways, args.ties)
    return (b,
            on_demand(reqs, args.prefills, args.sec_per_token, slo, budget))


def mean_tokens(long_share, short_tokens, long_tokens):
    return long_share * long_tokens[0] + (1 - long_share) * short_tokens[0]


def compare(args):
    short, long_ = (args.short, args.short_sd), (args.long, args.long_sd)
    capacity = args.prefills / (mean_tokens(args.long_share, short, long_) * args.sec_per_token)
    print(f"{args.prefills} prefills, {args.sec_per_token * 1e3:.2f} ms per prompt token: capacity "
          f"{capacity:.2f} req/s for this mix")
    for load in args.loads:
        rate = args.rate_a * load
        b, o = run(args, rate, args.long_share, short, long_, args.slo_ms / 1e3, args.slo_ms_per_token / 1e3)
        line = (f"load {load:g}A ({rate:.2f} req/s, utilisation {rate / capacity:.0%}): "
                f"baseline {b:.1%}, on-demand {o:.1%}")
        if args.gateways > 1:
            reqs = workload(rate, args.n, args.long_share, short, long_, args.seed)
            slo = lambda t: args.slo_ms / 1e3 + args.slo_ms_per_token / 1e3 * t  # noqa: E731
            budget = lambda t: args.budget_ms / 1e3 + args.budget_ms_per_token / 1e3 * t  # noqa: E731
            g = [on_demand_gateways(reqs, args.prefills, args.sec_per_token, slo, budget, args.gateways,
                                    args.tick, p) for p in (0.0, args.deadline_priority_ms / 1e3)]
            line += (f"; on-demand through {args.gateways} gateways {g[0]:.1%}, with deadline priority "
                     f"{g[1]:.1%}")
        print(line)


def scan(args):
    found = []
    for long_share in (0.02, 0.05, 0.1, 0.2, 0.3):
        for ratio in (5, 10, 25, 50):  # long prompt / short prompt
            for slo_in_shorts in (2, 5, 10, 20):  # short prompt's SLO in units of its prefill time
                short = (args.short, args.short * 0.25)
                long_ = (args.short * ratio, args.short * ratio * 0.15)
                for utilisation in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95):
                    capacity = args.prefills / (mean_tokens(long_share, short, long_) * args.sec_per_token)
                    slo_base = slo_in_shorts * args.short * args.sec_per_token
                    b, o = run(args, utilisation * capacity, long_share, short, long_, slo_base,
                               args.sec_per_token * 1.5)
                    if o >= 0.99:
                        found.append((b, o, long_share, ratio, slo_in_shorts, utilisation))
    found.sort()
    print(f"{args.prefills} prefills, {args.gateways} gateway(s): the mixes and loads where on-demand "
          f"forwarding meets the SLO for >= 99 %, worst baseline first")
    print("baseline  on-demand  long share  long/short  short SLO (x its prefill)  utilisation")
    for b, o, share, ratio, slo_in_shorts, utilisation in found[:args.top]:
        print(f"{b:8.1%}  {o:9.1%}  {share:10.2f}  {ratio:10d}  {slo_in_shorts:25d}  {utilisation:11.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["compare", "scan"])
    p.add_argument("--prefills", type=int, default=2, help="prefill instances, one slot each (2)")
    p.add_argument("--gateways", type=int, default=1,
                   help="gateways that do not share their stream counts (baseline) or their queues "
                        "(on-demand, with G > 1) (1)")
    p.add_argument("--ties", choices=["index", "random"], default="random",
                   help="baseline: among prefills of equal count, a random one (as the router) or the "
                        "lowest index")
    p.add_argument("--baseline-queues", choices=["prefill", "gateway"], default="prefill",
                   help="baseline: one FIFO queue in each prefill (the paper's, and the router's since "
                        "queue_if_full), or a queue per prefill held at each gateway (the router before)")
    p.add_argument("--sec-per-token", type=float, default=0.0025,
                   help="prefill seconds per prompt token (0.0025: one engine thread on the 2-vCPU VM)")
    p.add_argument("--n", type=int, default=20000, help="requests per run (20000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--short", type=float, default=64, help="short prompt tokens, mean (64)")
    p.add_argument("--short-sd", type=float, default=16)
    p.add_argument("--long", type=float, default=600, help="long prompt tokens, mean (600)")
    p.add_argument("--long-sd", type=float, default=100)
    p.add_argument("--long-share", type=float, default=0.2)
    p.add_argument("--rate-a", type=float, default=0.8, help="req/s of load A (0.8)")
    p.add_argument("--loads", type=float, nargs="+", default=[1, 2, 4, 6])
    p.add_argument("--slo-ms", type=float, default=1000)
    p.add_argument("--slo-ms-per-token", type=float, default=3)
    p.add_argument("--top", type=int, default=12, help="scan: rows to print (12)")
    p.add_argument("--tick", type=float, default=0.010, help="compare, G gateways: their retry period, s (0.010)")
    p.add_argument("--deadline-priority-ms", type=float, default=15,
                   help="compare, G gateways: the prefills' deadline-priority window (15)")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="compare, G gateways: the gateways' budget base (default: the SLO's)")
    p.add_argument("--budget-ms-per-token", type=float, default=None,
                   help="compare, G gateways: the budget per prompt token (default: the SLO's less the "
                        "prefill's own time)")
    args = p.parse_args()
    if args.budget_ms is None:
        args.budget_ms = args.slo_ms
    if args.budget_ms_per_token is None:
        args.budget_ms_per_token = max(0.0, args.slo_ms_per_token - args.sec_per_token * 1e3)
    compare(args) if args.mode == "compare" else scan(args)


if __name__ == "__main__":
    main()
