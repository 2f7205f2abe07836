"""The ``fedfuse`` command: one typer app with a sub-command per job."""

from __future__ import annotations

import typer

from fedfuse import __version__
from fedfuse.bench.aggregate import aggregate
from fedfuse.bench.llm_round import llm_round
from fedfuse.bench.merge_quality import merge_quality
from fedfuse.bench.overhead import overhead
from fedfuse.bench.quality import quality
from fedfuse.bench.robust import robust
from fedfuse.bench.scale import scale
from fedfuse.bench.wire import wire
from fedfuse.cli.demo import demo
from fedfuse.cli.eval import eval_command
from fedfuse.cli.export import export
from fedfuse.cli.grams import grams
from fedfuse.cli.merge import merge_app
from fedfuse.cli.models import models_app
from fedfuse.cli.security import certs, keys, registry_add
from fedfuse.cli.simulate import simulate

app = typer.Typer(
    name="fedfuse",
    help="Federated model merging: merge task vectors with FedAvg, TIES, DARE, Fisher and more.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", help="Print the fedfuse version and exit."),
) -> None:
    """fedfuse: federated and offline model merging."""
    if version:
        typer.echo(__version__)
        raise typer.Exit()


app.add_typer(merge_app, name="merge")
app.command("simulate", help="Run a federated simulation (Flower simulation engine) and write a report.")(simulate)
app.command(
    "export", help="Export a run's global model as a Hugging Face folder, or a LoRA run's ΔW as a PEFT adapter."
)(export)
app.command("certs", help="Make a CA and a SuperLink TLS certificate with the given SANs.")(certs)
app.command("keys", help="Make an institution's SuperNode auth and update-signing key pairs.")(keys)
registry_app = typer.Typer(
    help="The coordinator's registry of institutions' update-signing keys.", no_args_is_help=True
)
registry_app.command("add", help="Register an institution's update-signing public key.")(registry_add)
app.add_typer(registry_app, name="registry")
app.command("demo", help="Merge a generated three-institution example with several methods.")(demo)
app.command("grams", help="Gram matrices of a model's linear-layer inputs over a local file (regmean merges).")(grams)
app.command("eval", help="Evaluate a model folder on lm-evaluation-harness tasks, offline.")(eval_command)

bench_app = typer.Typer(help="Benchmarks: ratios against baselines measured in the same run.", no_args_is_help=True)
bench_app.command("aggregate", help="Server-side aggregation time and peak memory against Flower and PEFT.")(aggregate)
bench_app.command("wire", help="Bytes per parameter and encode/decode speed of update payloads.")(wire)
bench_app.command("quality", help="Accuracy, uplink, time of compression and merge methods; experts: merge-quality.")(
    quality
)
bench_app.command(
    "merge-quality", help="LoRA experts per skill on a chat LLM merged by every method: exact match, retention."
)(merge_quality)
bench_app.command("overhead", help="fedfuse round time against a plain Flower FedAvg app with the same training.")(
    overhead
)
bench_app.command("robust", help="Final accuracy of merge methods under simulated attacks, against clean runs.")(robust)
bench_app.command("scale", help="Round time and the server's peak RSS against institutions and clients sampled.")(scale)
bench_app.command("llm-round", help="Federated LoRA at LLM scale: dense, factor, SVD broadcast, FlowerTune.")(llm_round)
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")


if __name__ == "__main__":
    app()
