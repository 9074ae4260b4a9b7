"""Settings of stage one (``dinomix-cache extract``), as one resolved dataclass saved in the store."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from dinomix_cache.data.layouts import DATASETS
from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.data.roles import SplitSettings
from dinomix_cache.errors import UserError, check_choice
from dinomix_cache.phantom.generate import PhantomSettings
from dinomix_cache.store.feature_store import StoreSettings
from dinomix_cache.teacher.model import TeacherSettings


@dataclass(frozen=True)
class ExtractSettings:
    """Everything ``extract`` needs; the resolved copy is recorded in the store.

    Attributes:
        dataset: ``phantom`` (built-in, offline), ``synapse``, ``amos`` or ``msd``.
        data: dataset root; default ``data/<dataset>`` (the phantom is generated there).
        out: the store; default ``storage/<dataset>.zarr``.
        batch_size: slices per teacher forward; batches span case boundaries.
        workers: 0 = extract in this process (the overlapped pipeline of
            :mod:`stage1_extract.runner`); N > 0 = start a local ``dask.distributed`` cluster of
            N worker processes, one case per task (:mod:`stage1_extract.distributed`).
        scheduler: address of a running dask scheduler to use instead, e.g. ``tcp://head:8786``
            (the workers must see ``data``, ``out`` and the teacher at the same paths). Excludes
            ``workers``.
        connect_timeout: seconds to wait for ``scheduler`` before giving up.
        read_threads: threads reading and preprocessing cases while the teacher runs (in-process).
        prefetch: cases read ahead of the teacher (in-process; memory: one volume each).
        teacher_streams: parallel teacher forwards; None = one single-threaded stream per core
            on CPU, one stream on a GPU (see :mod:`stage1_extract.streams`). On a cluster: per
            worker, whose cores are shared among the worker processes of its host.
        crop_windows: (H, W) in slice pixels: also store the teacher's tokens of every window of
            this size on the token grid (the ``crop`` teacher view of training; set it to the training
            crop's in-plane size, e.g. 128×128). None: slice tokens only (the ``slice`` view).
        cases: only these case ids (the store still records the whole dataset).
        overwrite: delete an existing store at ``out`` first.
        progress: show a progress bar.

    Raises:
        UserError: an unknown ``dataset`` (naming ``--dataset``), ``workers`` negative, both ``workers``
            and ``scheduler`` given, an empty ``scheduler``, or ``read_threads`` < 1.
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
    workers: int = 0
    scheduler: str | None = None
    connect_timeout: float = 10.0
    read_threads: int = 2
    prefetch: int = 2
    teacher_streams: int | None = None
    crop_windows: tuple[int, int] | None = None
    cases: tuple[str, ...] | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # Discovery takes the name in any case and with spaces around it.
        check_choice(self.dataset.strip().lower(), DATASETS, "--dataset", "dataset")
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: give 0 (extract in this process) or a number of processes")
        if self.workers and self.scheduler:
            raise UserError(f"--workers {self.workers} and --scheduler {self.scheduler} exclude each other: give "
                            "--workers N for a local cluster or --scheduler ADDRESS to use a running one")
        if self.scheduler is not None and not self.scheduler.strip():
            raise UserError("--scheduler is empty: give an address like tcp://head:8786")
        if self.read_threads < 1:
            raise UserError(f"--read-threads {self.read_threads}: give 1 or more")

    @property
    def distributed(self) -> bool:
        """True when cases run as dask tasks (``workers`` > 0 or a ``scheduler``)."""
        return self.workers > 0 or self.scheduler is not None

    def resolved(self) -> ExtractSettings:
        """A copy with the default paths filled in."""
        data = self.data if self.data is not None else Path("data") / self.dataset
        out = self.out if self.out is not None else Path("storage") / f"{self.dataset}.zarr"
        return replace(self, data=Path(data), out=Path(out))
