"""Prefect flow `pretrain`: launch the JEPA pretraining job (`anysat pretrain`, torchrun when
nproc > 1) and report its loss, samples/s and collapse monitors as it goes.

Here the job is a local process; deployed on a GPU work pool it is the same command on a
GPU node. A rerun resumes from the newest complete checkpoint under `out`.

    python -m flows.pretrain --chips outputs/chips.zarr --out outputs/pretrain --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "anysat")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from flows.local_server import prefect_server  # noqa: E402


def pretrain_command(chips: list[str], out: str, model: str, steps: int, nproc: int,
                     batch_size: int, options: dict | None) -> list[str]:
    argv = [sys.executable, "-m", "anysat.cli", "pretrain", "--chips", ",".join(chips),
            "--out", out, "--model", model, "--steps", str(steps), "--nproc", str(nproc),
            "--batch-size", str(batch_size), "--json-progress"]
    for key, value in (options or {}).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return argv


@flow(name="pretrain")
def pretrain(chips: list[str], out: str, model: str = "tiny", steps: int = 1000, nproc: int = 1,
             batch_size: int = 8, options: dict | None = None) -> dict:
    """Pretrain from chip stores into `out` (checkpoints, metrics, final model). `options`
    are more `anysat pretrain` options by name, e.g. {"lr": 1e-4, "dim": 192, "workers": 2}."""
    logger = get_run_logger()
    command = pretrain_command(chips, out, model, steps, nproc, batch_size, options)
    logger.info("launching: %s", " ".join(command[1:]))
    curve, summary, errors = [], None, []

    def relay(stream) -> None:  # the job's log on our stderr; its error lines kept for the report
        for line in stream:
            sys.stderr.write(line)
            if "error:" in line:
                errors.append(line.strip())

    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as job:
        relay_thread = threading.Thread(target=relay, args=(job.stderr,), daemon=True)
        relay_thread.start()
        for line in job.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a non-JSON line on stdout (the job's logs go to stderr)
            if event.get("event") == "progress":
                curve.append(event)
                logger.info("step %d/%d: loss %.4f, %.1f samples/s, embedding std %.4f, RankMe "
                            "%.1f, loader wait %.0f %%", event["step"], steps, event["loss"],
                            event["samples_per_s"], event["embedding_std"], event["rankme"],
                            100 * event["loader_wait_share"])
            elif event.get("event") == "done":
                summary = event
    relay_thread.join()
    if job.returncode or summary is None:
        reason = errors[-1] if errors else f"exit {job.returncode}"
        raise RuntimeError(f"pretraining job failed ({reason}); rerun the flow to resume from "
                           f"the newest checkpoint under {out}")
    create_table_artifact(key="pretrain-curve", table=[
        {k: e[k] for k in ("step", "loss", "embedding_std", "rankme", "samples_per_s")} for e in curve],
        description="Loss and collapse monitors per logged step")
    create_markdown_artifact(key="pretrain-summary", markdown=(
        f"# pretrain\n\n| | |\n|---|---|\n| steps | {summary['steps']} |\n"
        f"| processes | {summary['world']} |\n| chips | {summary['chips']} |\n"
        f"| loss | {summary['first_loss']} → {summary['final_loss']} |\n"
        f"| model | `{summary['model']}` |\n"), description="What pretrain wrote")
    return {**summary, "curve": curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", required=True, help="chip store URI(s), comma-separated")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--options", default="{}", help="more `anysat pretrain` options, JSON")
    args = parser.parse_args(argv)
    try:
        with prefect_server():
            result = pretrain(args.chips.split(","), args.out, args.model, args.steps,
                              args.nproc, args.batch_size, json.loads(args.options))
    except RuntimeError as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
