"""The preprocessing job's exceptions: what the driver, the shard-set layout and the ledger raise and
`jobs.preprocess` turns into exit codes (a refused config or input, a fingerprint mismatch, failed shards,
a ledger that does not add up)."""

from __future__ import annotations


class PreprocessError(RuntimeError):
    """The job ran but its output is incomplete (failed shards)."""


class LedgerError(PreprocessError):
    """The written index and quarantine do not account for every manifest clip."""


class PreprocessConfigError(ValueError):
    """A configuration or input that the job refuses before running anything."""


class FingerprintMismatchError(PreprocessConfigError):
    """The output holds a shard set of another plan; `differences` names each input that differs."""

    def __init__(self, output: str, held: str, planned: str, differences: list[str]):
        self.differences = differences
        super().__init__(
            f"{output} holds the shard set of another plan (fingerprint {held[:12]}, this run's {planned[:12]}); "
            f"differing: {'; '.join(differences)}. Write to another data.shards.output, or run with --overwrite "
            "to remove the old set and build this one"
        )
