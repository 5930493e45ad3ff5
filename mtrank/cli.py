"""The ``mtrank`` command.

    mtrank fit|validate|test|predict --config FILE [--section.key value ...]
    mtrank synth --out DIR [--num-users N ...]
    mtrank prepare movielens|kuairand --src DIR --out DIR   (`mtrank.data.prepare`: public data -> tables)
    mtrank convert-checkpoint SRC DST       (`mtrank.convert`: ZeRO folder or file -> one fp32 file)
    mtrank export --config FILE --ckpt PATH --out DIR   (`mtrank.export`: plain-torch model file + model card)

``fit`` … ``predict`` are Lightning's CLI (jsonargparse): every encoder, head, task, optimiser,
logger and strategy comes from YAML and can be overridden on the command line. The task list and
the feature spec are written once, under ``model:``, and linked into ``data:``. ``predict`` writes
one Parquet row per sample (``--predict_output``, default ``runs/predictions.parquet``).
"""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mtrank.callbacks import ParquetPredictionWriter
from mtrank.data.datamodule import RankingDataModule
from mtrank.module import RankingModule

TRAINER_DEFAULTS = {
    # the data module's sampler shards by rank itself, with no duplicates and equal batch counts
    "use_distributed_sampler": False,
    "default_root_dir": "runs",
    "logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "mtrank"}},
        {"class_path": "mtrank.loggers.WandbLogger", "init_args": {"save_dir": "runs", "offline": True}},
    ],
}


class MTRankCLI(LightningCLI):
    """Lightning's CLI with mtrank's links between the model's and the data's settings."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.features", "data.features", apply_on="parse")
        parser.link_arguments("model.tasks", "data.tasks", apply_on="parse")
        parser.add_argument(
            "--predict_output", type=str, default="runs/predictions.parquet", help="Parquet file written by predict"
        )

    def before_predict(self) -> None:
        if not any(isinstance(cb, ParquetPredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(ParquetPredictionWriter(self.config["predict"]["predict_output"]))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtrank`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args and args[0] == "synth":
        from mtrank.data.synth import main as synth_main

        return synth_main(args[1:])
    if args and args[0] == "prepare":
        from mtrank.data.prepare import main as prepare_main

        return prepare_main(args[1:])
    if args and args[0] == "convert-checkpoint":
        from mtrank.convert import main as convert_main

        return convert_main(args[1:])
    if args and args[0] == "export":
        from mtrank.export import main as export_main

        return export_main(args[1:])
    MTRankCLI(
        RankingModule,
        RankingDataModule,
        args=None if argv is None else args,  # None: Lightning reads sys.argv itself
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    return 0
