"""Test setup: everything offline, Hugging Face caches in a temporary folder, tiny models built from configs."""

import os
import tempfile

# Set before transformers/diffusers/datasets/evaluate are imported anywhere: no test may reach the Hub.
_HF_HOME = tempfile.mkdtemp(prefix="vpd_hf_tests_hf_home_")
os.environ.update(
    HF_HOME=_HF_HOME,
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_EVALUATE_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    TOKENIZERS_PARALLELISM="false",
)

import pytest  # noqa: E402
import torch  # noqa: E402

import vpd_hf  # noqa: E402
from vpd_hf.testing_utils import save_tiny_stable_diffusion, tiny_vpd_config  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random Stable Diffusion checkpoint in the Hub's diffusers layout."""
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"), seed=0)


def _starts_background(item: pytest.Item) -> bool:
    return hasattr(getattr(item, "module", None), "start_in_background")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with background work (see `background_work`) run last, when their work has had the whole session to
    finish; the order within each group is kept."""
    items.sort(key=_starts_background)


@pytest.fixture(scope="session", autouse=True)
def background_work(request):
    """Test modules with long, independent subprocess work define `start_in_background(request)` (and
    `stop_background()`): it is started when the session starts, if the session runs any of their tests, so that it
    overlaps with the rest of the suite instead of running alone when their turn comes."""
    modules = {item.module for item in request.session.items if _starts_background(item)}
    for module in sorted(modules, key=lambda module: module.__name__):
        module.start_in_background(request)
    yield
    for module in modules:
        module.stop_background()


@pytest.fixture
def depth_config():
    return tiny_vpd_config()


@pytest.fixture
def depth_model(depth_config):
    torch.manual_seed(0)
    model = vpd_hf.VPDModelForDepthEstimation(depth_config).eval()
    # Give the prompt table distinct rows (a fresh model has zeros) so conditioning is observable.
    model.vpd.prompt_embeddings.normal_(generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture
def make_pixels():
    """`make_pixels(*shape, seed=0)`: reproducible images in [-1, 1]."""

    def make(*shape, seed=0):
        return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    return make


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision included): a training run in the test process starts
    from a clean one (modules that train use it through `pytestmark`)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
