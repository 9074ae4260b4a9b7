"""How a store's arrays are laid out and compressed: the ``storage`` section and each array's codecs.

:class:`StoreSettings` is what ``extract`` is told (``--compression``, ``--keepbits``,
``--chunk-slices``, ``--no-volumes``) and what the store records as ``storage``;
:func:`array_codecs` turns it into the codec chain of one array. The dimension names are written
with every array (xarray and other Zarr readers show them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, get_args

from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.codecs.numcodecs import BitRound
from zarr.errors import ZarrUserWarning

from dinomix_cache.errors import SettingsError, check_choice

__all__ = ["COMPRESSIONS", "FEATURE_DIMS", "VOLUME_DIMS", "WINDOW_DIMS", "Compression", "StoreSettings", "array_codecs"]

FEATURE_DIMS = ("slice", "token_row", "token_col", "channel")
VOLUME_DIMS = ("slice", "row", "col")
WINDOW_DIMS = ("slice", "window_row", "window_col", "token_row", "token_col", "channel")
# zarr warns on every array using a numcodecs filter (BitRound, the lossy mode) that other Zarr
# implementations may not read it; the README says so once, the warning would say it per chunk read.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=ZarrUserWarning)

Compression = Literal["lossless", "lossy", "none"]
COMPRESSIONS: tuple[Compression, ...] = get_args(Compression)


@dataclass(frozen=True)
class StoreSettings:
    """How arrays are laid out and compressed. Recorded in the store as ``storage``.

    Attributes:
        compression: ``"lossless"`` (Blosc with byte shuffle: LZ4 for features, which barely compress
            at any level, zstd for volumes, ≈ 3.4× on CT),
            ``"lossy"`` (bit rounding to ``keepbits`` mantissa bits before Blosc: relative error
            at most 2^-(keepbits+1), 0.39 % for keepbits 7), or ``"none"``.
        keepbits: mantissa bits kept by the lossy mode (1..9; float16 has 10).
        chunk_slices: slices per chunk; a chunk spans the whole plane and all channels, so a
            crop of Z slices reads about Z / chunk_slices + 1 chunks.
        volumes: also store the preprocessed image and label volumes (training then needs
            nothing else). Off where images may not be shared.
    """

    compression: Compression = "lossless"
    keepbits: int = 7
    chunk_slices: int = 16
    volumes: bool = True

    def __post_init__(self) -> None:
        check_choice(self.compression, COMPRESSIONS, "--compression", "compression")
        if not 1 <= self.keepbits <= 9:
            raise SettingsError(f"keepbits {self.keepbits} out of range (--keepbits): use 1..9 (float16 has 10 "
                                "mantissa bits)")
        if self.chunk_slices < 1:
            raise SettingsError(f"chunk_slices must be >= 1 (--chunk-slices), got {self.chunk_slices}")


def array_codecs(settings: StoreSettings, features: bool) -> dict[str, Any]:
    """Codec chain of an array: Blosc with byte shuffle, then a CRC-32C checksum.

    Features use LZ4: float16 tokens barely compress at any zstd level, and writing must hide
    behind the teacher. Volumes use zstd level 1: CT compresses well at that level already.
    """
    # A CRC-32C checksum on every chunk lets `verify` detect a flipped byte, compressed or not.
    if settings.compression == "none":
        return {"compressors": [Crc32cCodec()]}
    lossy = settings.compression == "lossy" and features
    if lossy:  # the rounded-off mantissa bits are zeros that zstd removes
        blosc = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    else:
        blosc = BloscCodec(cname="lz4" if features else "zstd", clevel=5 if features else 1, shuffle="shuffle")
    out: dict[str, Any] = {"compressors": [blosc, Crc32cCodec()]}
    if lossy:
        out["filters"] = [BitRound(keepbits=settings.keepbits)]
    return out
