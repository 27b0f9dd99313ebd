"""`python -m pipeline status [RUN]`, `python -m pipeline report [RUN]`,
`python -m pipeline chat [RUN] [--stage ppo]`,
`python -m pipeline plan STAGE [key=value ...] [--launcher L --nproc N --gpu-mem GiB]` and
`python -m pipeline run [--run RUN] [--from STAGE] [key=value ...]` and
`python -m pipeline study [--world-seeds W,.. --seeds S,..] [key=value ...]` and
`python -m pipeline overopt [--run RUN --betas B,..] [key=value ...]` and
`python -m pipeline rm-curve [--run RUN --sizes N,..] [key=value ...]`."""
from __future__ import annotations

import argparse
import sys

from pipeline import registry, runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # its own parser: the stage's key=value settings pass through
        from pipeline.plan import main as plan

        return plan(argv[1:])
    if argv[:1] == ["study"]:
        from pipeline.study import main as study

        return study(argv[1:])
    if argv[:1] == ["overopt"]:
        from pipeline.overopt import main as overopt

        return overopt(argv[1:])
    if argv[:1] == ["rm-curve"]:
        from pipeline.rm_curve import main as rm_curve

        return rm_curve(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan", help="what each GPU will hold for a stage, before launching (see --help of it)")
    sub.add_parser("study", help="the pipeline over world seeds x training seeds, one table (see --help of it)")
    sub.add_parser("overopt", help="PPO over a sweep of KL coefficients: gold and RM score against KL (see --help of it)")
    sub.add_parser("rm-curve", help="the reward model's held-out accuracy against its number of comparisons (see --help of it)")
    st = sub.add_parser("status", help="print a run's stages, status and headline metrics")
    st.add_argument("run", nargs="?", default="default")
    st.add_argument("--runs-dir", default="runs")
    rp = sub.add_parser("report", help="(re)build runs/<run>/report/report.md from the run's files")
    rp.add_argument("run", nargs="?", default="default")
    rp.add_argument("--runs-dir", default="runs")
    ch = sub.add_parser("chat", help="talk to a stage's model in its chat template (/reset, /quit)")
    ch.add_argument("run", nargs="?", default="default")
    ch.add_argument("--stage", choices=registry.NAMES, default="ppo",
                    help="whose model (a reward model is refused: chat with a causal LM stage)")
    ch.add_argument("--runs-dir", default="runs")
    ch.add_argument("--ema", action="store_true", help="ppo: the EMA policy (model_ema/) instead of model/")
    ch.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ch.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
    ch.add_argument("--system", default=None, help="a system message at the start of every conversation")
    ch.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
    rn = sub.add_parser("run", help="run pretrain -> sft -> rm -> ppo (or --stages), skipping stages already complete")
    rn.add_argument("--run", default="default", help="run name (runs/<run>/)")
    rn.add_argument("--runs-dir", default="runs")
    rn.add_argument("--from", dest="from_stage", choices=registry.NAMES, default=None,
                    help="re-run this stage and the stages that train from it, even if complete")
    rn.add_argument("--stages", default=",".join(registry.CHAIN),
                    help=f"comma-separated stages to run, in the graph's order (of {', '.join(registry.NAMES)})")
    rn.add_argument("--no-ptx-ablation", dest="ptx_ablation", action="store_false",
                    help="skip the second PPO run (other ptx setting) behind the report's alignment-tax table")
    rn.add_argument("overrides", nargs="*", help="key=value overrides passed to every stage")
    args = parser.parse_args(argv)
    if args.cmd == "status":
        rows = runs.run_status(args.runs_dir, args.run)
        print(f"run '{args.run}' ({args.runs_dir}/{args.run})")
        print(runs.format_table(rows))
        return 0
    if args.cmd == "report":
        from pipeline.report import write_report

        print(write_report(args.runs_dir, args.run))
        return 0
    if args.cmd == "chat":
        from pipeline.chat import main as chat

        try:
            return chat(args)
        except runs.HandoffError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    from pipeline.driver import run_pipeline

    return run_pipeline(args.run, args.runs_dir, args.from_stage, args.stages.split(","), args.overrides,
                        args.ptx_ablation)


if __name__ == "__main__":
    sys.exit(main())
