"""Command-line options that several command modules share (training.cli imports the others while it loads, so
they cannot take these from it)."""

from __future__ import annotations

from pathlib import Path

import click

INTERACTIONS_OPTION = click.option(
    "--interactions", "interactions_files", type=click.Path(path_type=Path), multiple=True, required=True,
    help="CSV, CSV.gz or Parquet with customer_id and item_id columns. Repeat it to read several files as one, "
         "in any mix of formats; a quoted glob pattern ('events/*.csv') reads the files it matches, sorted by name.")
