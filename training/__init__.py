"""recsvc's offline trainer: ingest, fit strategies, evaluate, publish model versions. Never imports Flask."""
