"""Teacher views: the geometry of x_mix, and where a crop lies in its slice or its crop window."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stage2_train.sampling.crops import Crop
from stage2_train.targets.views import MixedCrop


def test_mixed_crop_validation():
    unl = Crop("0001", (0, 0, 0), (32, 48, 48))
    item = MixedCrop(unl, replace(unl, case_id="0002"), (slice(None), slice(8, None), slice(0, 0)))
    assert item.box == (slice(0, 32), slice(8, 48), slice(0, 0)) and not item.mixed
    assert not MixedCrop(unl).mixed
    with pytest.raises(ValueError, match="both"):
        MixedCrop(unl, unl)
    with pytest.raises(ValueError, match="size"):
        MixedCrop(unl, replace(unl, size=(16, 48, 48)), (slice(0, 1),) * 3)
