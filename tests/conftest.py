"""Shared fixtures: one tiny backbone per test session, written to a temporary directory."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prm  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory):
    return prm.save_tiny_backbone(str(tmp_path_factory.mktemp("tiny") / "backbone"))


@pytest.fixture(scope="session")
def tiny_prm(backbone_dir):
    return prm.PRM.from_backbone(backbone_dir).eval()


@pytest.fixture
def images(tmp_path):
    """Three small PNGs of different sizes (different image-token counts)."""
    from PIL import Image, ImageDraw
    paths = []
    for i, (w, h) in enumerate([(56, 56), (90, 60), (112, 112)]):
        im = Image.new("RGB", (w, h), (255 - 60 * i, 40 * i, 90))
        ImageDraw.Draw(im).ellipse([5, 5, w - 5, h - 5], fill=(20 * i, 200, 30))
        p = tmp_path / f"img{i}.png"
        im.save(p)
        paths.append(str(p))
    return paths
