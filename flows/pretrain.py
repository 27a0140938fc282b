"""Prefect flow `pretrain`: launch the JEPA pretraining job (`anysat pretrain`, torchrun when
nproc > 1) and report its loss, samples/s and collapse monitors as it goes.

Here the job is a local process; deployed on a GPU work pool it is the same command on a
GPU node. A rerun resumes from the newest complete checkpoint under `out`.

    python -m flows.pretrain --chips outputs/chips.zarr --out outputs/pretrain --steps 200
    (the same options as `anysat pretrain`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "anysat")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from anysat.errors import AnySatError  # noqa: E402
from anysat.train.trainer import TrainConfig  # noqa: E402
from flows.local_server import prefect_server  # noqa: E402


def pretrain_command(config: TrainConfig, nproc: int) -> list[str]:
    """`anysat pretrain` with every field of the config as its option (torchrun when
    nproc > 1): the job runs the same code path as the CLI."""
    argv = [sys.executable, "-m", "anysat.cli", "pretrain", "--nproc", str(nproc), "--json-progress"]
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name in ("provenance", "json_progress") or value is None:
            continue
        flag = "--" + item.name.replace("_", "-")
        argv += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return argv


@flow(name="pretrain", validate_parameters=True)
def pretrain(config: TrainConfig, nproc: int = 1) -> dict:
    """Pretrain from chip stores into `config.out` (checkpoints, metrics, final model) with
    `nproc` processes (torchrun DDP when > 1). The parameter is the training config itself
    (anysat.train.trainer.TrainConfig): the UI renders its fields."""
    config.check()  # options out of range fail here, before the job starts
    if nproc < 1:
        raise AnySatError(f"nproc is {nproc}: expected a whole number of at least 1")
    logger = get_run_logger()
    command = pretrain_command(config, nproc)
    steps, out = config.steps, config.out
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
    from anysat.cli import add_pretrain_arguments, train_config_from_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pretrain_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with prefect_server():
            result = pretrain(train_config_from_args(args, argv or sys.argv[1:]), args.nproc)
    except RuntimeError as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
