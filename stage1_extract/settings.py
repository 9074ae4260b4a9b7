"""Settings of stage one (``dinomix-cache extract``), as one resolved dataclass saved in the store."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from dinomix_cache.datasets import SplitSettings
from dinomix_cache.phantom import PhantomSettings
from dinomix_cache.preprocess import PreprocessSettings
from dinomix_cache.store import StoreSettings
from dinomix_cache.teacher import TeacherSettings


@dataclass(frozen=True)
class ExtractSettings:
    """Everything ``extract`` needs; the resolved copy is recorded in the store.

    Attributes:
        dataset: ``phantom`` (built-in, offline), ``synapse``, ``amos`` or ``msd``.
        data: dataset root; default ``data/<dataset>`` (the phantom is generated there).
        out: the store; default ``storage/<dataset>.zarr``.
        batch_size: slices per teacher forward; batches span case boundaries.
        workers: threads reading and preprocessing cases while the teacher runs.
        prefetch: cases read ahead of the teacher (memory: one volume each).
        teacher_streams: parallel teacher forwards; None = one single-threaded stream per core
            on CPU, one stream on a GPU (see :mod:`stage1_extract.streams`).
        cases: only these case ids (the store still records the whole dataset).
        overwrite: delete an existing store at ``out`` first.
        progress: show a progress bar.
    """

    dataset: str = "phantom"
    data: Path | None = None
    out: Path | None = None
    split: SplitSettings = field(default_factory=SplitSettings)
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    storage: StoreSettings = field(default_factory=StoreSettings)
    phantom: PhantomSettings = field(default_factory=PhantomSettings)
    batch_size: int = 32
    workers: int = 2
    prefetch: int = 2
    teacher_streams: int | None = None
    cases: tuple[str, ...] | None = None
    overwrite: bool = False
    progress: bool = True

    def resolved(self) -> ExtractSettings:
        """A copy with the default paths filled in."""
        data = self.data if self.data is not None else Path("data") / self.dataset
        out = self.out if self.out is not None else Path("storage") / f"{self.dataset}.zarr"
        return replace(self, data=Path(data), out=Path(out))
