"""An image's prediction does not depend on the other images of its batch (sizes, batch size, entry point)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import vpd_hf
from vpd_hf import VPDImageProcessor
from vpd_hf.batching import crop, merge, size_groups, valid_extent
from vpd_hf.pipelines import VPDDepthEstimationPipeline, VPDImageSegmentationPipeline
from vpd_hf.testing_utils import randomize_weights, tiny_referring_config, tiny_segmentation_config, tiny_vpd_config

# Sizes (width, height) that the tiny processor below turns into four different padded sizes, and two alike.
SIZES = [(70, 50), (40, 90), (64, 64), (100, 30), (50, 70), (33, 47), (90, 40), (64, 60)]


def fp32_close(batched: torch.Tensor, single: torch.Tensor, tolerance: float = 1e-5) -> None:
    """The fp32 tolerance: max abs difference <= 1e-5 of the output's range (1e-2, about bf16's epsilon, in bf16)."""
    scale = max(float(single.max() - single.min()), 1e-6)
    assert float((batched.float() - single.float()).abs().max()) <= tolerance * scale


def perturb(model, seed=0):
    """Every weight gets a visible random value, so that padding seen by any layer changes the output."""
    return randomize_weights(model, seed)


# A probability within TIE of the 0.5 threshold is a tie that float rounding decides (fp32 outputs agree to ~1e-6).
TIE = 1e-5
# Masks where only the probabilities are at hand (pipeline, saved PNGs): at most this share of pixels may differ, the
# ties. The defect this guards against moved 10-18 % of the pixels.
MASK_TIES = 1e-3


def assert_same_mask(batched: np.ndarray, single: np.ndarray) -> None:
    changed = float((batched.astype(bool) != single.astype(bool)).mean())
    assert batched.shape == single.shape and changed <= MASK_TIES, changed


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="module")
def processor():
    # shortest edge 48 (longest at most 160): padded sizes 64x128, 128x64, 64x64, 64x192, ...
    return VPDImageProcessor(size={"shortest_edge": 48, "longest_edge": 160})


@pytest.fixture(scope="module")
def keeping():
    """A processor that keeps each image's size (only pads to 64): the images of SIZES get seven padded sizes."""
    return VPDImageProcessor(do_resize=False)


@pytest.fixture(scope="module")
def depth_model():
    torch.manual_seed(0)
    return perturb(vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config()))


@pytest.fixture(scope="module")
def seg_model():
    torch.manual_seed(0)
    config = tiny_segmentation_config(["wall", "floor", "sky"], semantic_inference_mode="whole")
    return perturb(vpd_hf.VPDModelForSegmentation(config))


@pytest.fixture(scope="module")
def ref_model():
    torch.manual_seed(0)
    return perturb(vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config(token_length=8)))


def test_size_groups_by_own_padded_size():
    mask = torch.zeros(4, 128, 192, dtype=torch.long)
    for index, (h, w) in enumerate([(128, 150), (50, 60), (64, 64), (100, 192)]):
        mask[index, :h, :w] = 1
    assert valid_extent(mask).tolist() == [[128, 150], [50, 60], [64, 64], [100, 192]]
    groups = size_groups(mask, 64)
    assert [(g.indices.tolist(), g.size) for g in groups] == [([0, 3], (128, 192)), ([1, 2], (64, 64))]
    assert size_groups(mask[[0, 3]], 64) is None  # nothing to split: both run at the batch's size
    assert size_groups(None, 64) is None
    mask[2] = 0
    with pytest.raises(ValueError, match=r"pixel_mask\[2\]"):
        size_groups(mask, 64)


def test_merge_restores_batch_order_and_pads():
    mask = torch.zeros(3, 128, 128, dtype=torch.long)
    mask[0, :64, :64] = mask[1] = mask[2, :60, :10] = 1
    groups = size_groups(mask, 64)
    values = torch.arange(3.0)[:, None, None, None].expand(3, 1, 128, 128)
    parts = [crop(values, g) for g in groups]
    merged = merge(parts, [g.indices for g in groups], 3, size=(128, 128))
    expected = values.clone()
    expected[[0, 2], :, 64:] = 0
    expected[[0, 2], :, :, 64:] = 0
    assert torch.equal(merged, expected)


def _single_and_batched(run, inputs, batch_size):
    """`run(list_of_inputs) -> list of per-input outputs`, alone and in batches of `batch_size`."""
    single = [run([item])[0] for item in inputs]
    batched = [out for start in range(0, len(inputs), batch_size) for out in run(inputs[start : start + batch_size])]
    return single, batched


@pytest.mark.parametrize(("batch_size", "dtype"), [(2, torch.float32), (8, torch.float32), (8, torch.bfloat16)])
def test_depth_model_is_batch_invariant(depth_model, processor, batch_size, dtype):
    model = depth_model if dtype == torch.float32 else copy.deepcopy(depth_model).to(dtype)

    def run(batch):
        inputs = processor(images=batch, return_tensors="pt").to(dtype)
        with torch.no_grad():
            outputs = model(**inputs)
        sizes = [image.size[::-1] for image in batch]
        return [r["predicted_depth"] for r in processor.post_process_depth_estimation(outputs, target_sizes=sizes)]

    single, batched = _single_and_batched(run, images(), batch_size)
    for a, b in zip(single, batched, strict=True):
        fp32_close(b, a, tolerance=1e-5 if dtype == torch.float32 else 1e-2)


def test_depth_padding_beyond_an_image_changed_it_before(depth_model, processor):
    """The property the grouping restores: the same image padded more predicts something else."""
    image = images()[0]
    tight = processor(images=image, return_tensors="pt")
    loose = processor(images=image, return_tensors="pt", size_divisor=256)
    with torch.no_grad():
        a = depth_model.vpd(pixel_values=tight.pixel_values).feature_maps[0]
        b = depth_model.vpd(pixel_values=loose.pixel_values).feature_maps[0]
    h, w = a.shape[-2:]
    assert float((a - b[..., :h, :w]).abs().max()) > 1e-3


@pytest.mark.parametrize("batch_size", [2, 8])
def test_segmentation_model_is_batch_invariant(seg_model, processor, batch_size):
    def run(batch):
        inputs = processor(images=batch, return_tensors="pt")
        with torch.no_grad():
            outputs = seg_model(**inputs)
        sizes = [image.size[::-1] for image in batch]
        # the scores before arg-max: compare values, not labels that flip on ties
        return [seg_model_scores(processor, outputs, index, size) for index, size in enumerate(sizes)]

    single, batched = _single_and_batched(run, images(1), batch_size)
    for a, b in zip(single, batched, strict=True):
        fp32_close(b, a)


def seg_model_scores(processor, outputs, index, size):
    mask = outputs.pixel_mask[index]
    return processor._scores_to_target(outputs.logits[index : index + 1], mask, size)[0]


@pytest.mark.parametrize("batch_size", [2, 8])
@pytest.mark.parametrize("preprocessing", ["processor", "keeping"])
def test_referring_model_is_batch_invariant(ref_model, request, preprocessing, batch_size):
    processor = request.getfixturevalue(preprocessing)
    generator = torch.Generator().manual_seed(0)
    texts = torch.randint(0, 700, (len(SIZES), 2, 8), generator=generator)  # two expressions per image
    pictures = images(2)

    def run(batch):
        index = [pictures.index(image) for image in batch]
        inputs = processor(images=batch, return_tensors="pt")
        input_ids = texts[index].flatten(0, 1)
        image_indices = torch.arange(len(batch)).repeat_interleave(2)
        with torch.no_grad():
            outputs = ref_model(**inputs, input_ids=input_ids, image_indices=image_indices)
        sizes = [batch[i].size[::-1] for i in image_indices.tolist()]
        results = processor.post_process_referring_segmentation(outputs, target_sizes=sizes)
        return [
            {key: torch.stack([r[key] for r in results[2 * i : 2 * i + 2]]) for key in ("probabilities", "mask")}
            for i in range(len(batch))
        ]

    single, batched = _single_and_batched(run, pictures, batch_size)
    for a, b in zip(single, batched, strict=True):
        fp32_close(b["probabilities"], a["probabilities"])
        # labels at the threshold are float rounding's to decide: identical elsewhere
        decided = (a["probabilities"] - 0.5).abs() > TIE
        assert torch.equal(b["mask"][decided], a["mask"][decided])


@pytest.mark.parametrize("batch_size", [2, 8])
def test_segmentation_and_depth_are_batch_invariant_with_a_size_keeping_processor(
    seg_model, depth_model, keeping, batch_size
):
    def run(batch):
        inputs = keeping(images=batch, return_tensors="pt")
        with torch.no_grad():
            seg, depth = seg_model(**inputs), depth_model(**inputs)
        depths = keeping.post_process_depth_estimation(depth)
        labels = keeping.post_process_semantic_segmentation(seg)
        return [
            {
                "scores": seg_model_scores(keeping, seg, i, None),
                "labels": labels[i],
                "depth": depths[i]["predicted_depth"],
            }
            for i in range(len(batch))
        ]

    single, batched = _single_and_batched(run, images(8), batch_size)
    for a, b in zip(single, batched, strict=True):
        fp32_close(b["scores"], a["scores"])
        fp32_close(b["depth"], a["depth"])
        assert torch.equal(b["labels"], a["labels"])


def test_post_processing_crops_each_image_to_its_own_grid():
    """The issue's repro: the same 1/8 logits alone, and zero-padded into a batch grid four times larger."""
    logits = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    alone = {"logits": logits, "pixel_mask": torch.ones(1, 64, 64, dtype=torch.long)}
    padded_mask = torch.zeros(1, 256, 256, dtype=torch.long)
    padded_mask[:, :64, :60] = 1  # the image: 64 x 60, padded to 64 x 64 when alone
    alone_cropped = {"logits": logits, "pixel_mask": padded_mask[:, :64, :64]}
    in_batch = {"logits": torch.nn.functional.pad(logits, (0, 24, 0, 24)), "pixel_mask": padded_mask}
    processor = VPDImageProcessor()
    official = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=True)
    expected = official.softmax(dim=1)[0, 1]
    got = processor.post_process_referring_segmentation(alone)[0]["probabilities"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # the official result for one unpadded image
    for outputs in (alone_cropped, in_batch):
        got = processor.post_process_referring_segmentation(outputs)[0]["probabilities"]
        torch.testing.assert_close(got, expected[:, :60], rtol=0, atol=1e-6)
    seg_alone = processor._scores_to_target(logits, alone_cropped["pixel_mask"][0], None)
    seg_batch = processor._scores_to_target(in_batch["logits"], padded_mask[0], None)
    torch.testing.assert_close(seg_batch, seg_alone, rtol=0, atol=1e-6)


def test_referring_loss_does_not_depend_on_the_batch(keeping):
    """Training on mixed sizes: each expression's loss is the one it has alone (labels upsampled on its own grid)."""
    torch.manual_seed(0)
    model = perturb(vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config(token_length=8)))
    pictures = images(9)[:3]
    input_ids = torch.randint(0, 700, (3, 8), generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 2, (image.size[1], image.size[0])) for image in pictures]

    def loss_of(indices):
        inputs = keeping(images=[pictures[i] for i in indices], segmentation_maps=[masks[i] for i in indices],
                         return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            return model(**inputs, input_ids=input_ids[indices]).loss

    # the class-weighted mean over all pixels of a batch, from the losses and weights alone
    weights = torch.tensor(model.config.referring_loss_weights)
    alone = [(loss_of([i]), weights[torch.as_tensor(masks[i])].sum()) for i in range(3)]
    expected = sum(loss * weight for loss, weight in alone) / sum(weight for _, weight in alone)
    torch.testing.assert_close(loss_of([0, 1, 2]), expected, rtol=1e-5, atol=0)


def test_training_on_mixed_sizes_backpropagates_through_the_groups(depth_model, processor):
    """Gradients flow through the grouped path: cropping, padding and re-ordering the groups are differentiable."""
    batch = images()[:3]
    inputs = processor(images=batch, return_tensors="pt")
    labels = torch.rand(inputs.pixel_mask.shape) * 5 + 0.5
    torch.manual_seed(0)
    model = vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config()).train()  # fresh: a perturbed head saturates
    loss = model(pixel_values=inputs.pixel_values, pixel_mask=inputs.pixel_mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    for part in (model.head, model.vpd.unet):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert (
            grads
            and all(g is not None for g in grads[:4])
            and float(sum(g.abs().sum() for g in grads if g is not None)) > 0
        )


# -- pipelines ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_folders(tiny_sd_dir, tmp_path_factory, processor):
    """Saved depth, segmentation and referring models from the tiny SD folder, with the small-size processor."""
    return save_task_folders(tiny_sd_dir, tmp_path_factory.mktemp("pipelines"), processor)


@pytest.fixture(scope="module")
def size_keeping_folders(tiny_sd_dir, tmp_path_factory, keeping):
    """The same models with a processor that keeps each image's size (the case the resizing presets hide)."""
    return save_task_folders(tiny_sd_dir, tmp_path_factory.mktemp("size_keeping"), keeping)


def save_task_folders(tiny_sd_dir, root, processor):
    from vpd_hf import VPDProcessor
    from vpd_hf.testing_utils import TINY_DEPTH_HEAD, TINY_SEGMENTATION_HEAD

    models = {
        "depth": vpd_hf.VPDModelForDepthEstimation.from_stable_diffusion(
            tiny_sd_dir, show_progress=False, **TINY_DEPTH_HEAD
        ),
        "segmentation": vpd_hf.VPDModelForSegmentation.from_stable_diffusion(
            tiny_sd_dir, class_names=["wall", "floor", "sky"], show_progress=False, **TINY_SEGMENTATION_HEAD
        ),
        "referring": vpd_hf.VPDModelForReferringSegmentation.from_stable_diffusion(
            tiny_sd_dir, token_length=8, show_progress=False
        ),
    }
    folders = {}
    tokenizer = VPDProcessor.from_stable_diffusion(tiny_sd_dir, token_length=8).tokenizer
    for task, model in models.items():
        folders[task] = root / task
        perturb(model, seed=3)
        model.config.semantic_inference_mode = "whole"  # one pass: the size grouping of the model is what is tested
        if task == "referring":
            processor = VPDProcessor(image_processor=processor, tokenizer=tokenizer)
            centre_referring_logits(model, processor)
        model.save_pretrained(folders[task])
        processor.save_pretrained(folders[task])
    return folders


def centre_referring_logits(model, processor, image=None, text="the left box"):
    """Shifts the foreground bias so that about half of the pixels of a test image are foreground: the masks then
    have edges, where a change of the probabilities shows (a random head predicts all-background). The shift is off
    the median by a fraction of the spread: at the median itself a pixel would sit exactly on the threshold, where
    float rounding decides its label."""
    inputs = processor(images=images(7)[0] if image is None else image, text=text, return_tensors="pt")
    with torch.no_grad():
        margin = model(**inputs).logits.diff(dim=1)
        model.decoder.conv1_1.bias[1] -= float(margin.median() + 0.0123 * margin.std())


def test_depth_pipeline_batches_mixed_sizes(pipeline_folders):
    from transformers import pipeline

    estimator = pipeline("depth-estimation", model=str(pipeline_folders["depth"]))
    assert type(estimator) is VPDDepthEstimationPipeline
    pictures = images(4)
    single = [estimator(image)["predicted_depth"] for image in pictures]
    for batch_size in (2, 8):
        batched = estimator(pictures, batch_size=batch_size)
        assert [r["predicted_depth"].shape for r in batched] == [(h, w) for w, h in SIZES]
        for a, b in zip(single, batched, strict=True):
            fp32_close(b["predicted_depth"], a)
            assert b["depth"].size == a.shape[::-1]


def test_segmentation_pipeline_batches_mixed_sizes(pipeline_folders):
    from transformers import pipeline

    segmenter = pipeline("image-segmentation", model=str(pipeline_folders["segmentation"]))
    assert type(segmenter) is VPDImageSegmentationPipeline
    pictures = images(5)

    def label_map(result):
        names = ["wall", "floor", "sky"]
        return sum(names.index(r["label"]) * (np.asarray(r["mask"]) > 0) for r in result)

    single = [label_map(segmenter(image)) for image in pictures]
    for batch_size in (2, 8):
        batched = segmenter(pictures, batch_size=batch_size)
        for a, b in zip(single, batched, strict=True):
            np.testing.assert_array_equal(label_map(b), a)


@pytest.mark.parametrize("folders", ["pipeline_folders", "size_keeping_folders"])
def test_referring_pipeline_batches_images_with_several_expressions(request, folders):
    from transformers import pipeline

    segmenter = pipeline("referring-image-segmentation", model=str(request.getfixturevalue(folders)["referring"]))
    pictures = images(6)[:5]
    requests = [
        {"image": image, "text": ["the left box", "a red sphere"][: 1 + i % 2]} for i, image in enumerate(pictures)
    ]
    requests[0]["text"] = "the floor"  # a single expression gives a single result
    single = [segmenter(request) for request in requests]
    for batch_size in (2, 8):
        batched = segmenter(requests, batch_size=batch_size)
        for a, b in zip(single, batched, strict=True):
            a, b = ([a], [b]) if isinstance(a, dict) else (a, b)
            assert [r["text"] for r in b] == [r["text"] for r in a]
            for x, y in zip(a, b, strict=True):
                assert x["mask"].size == y["mask"].size
                assert_same_mask(np.asarray(y["mask"]), np.asarray(x["mask"]))
                assert abs(x["score"] - y["score"]) <= 1e-5


@pytest.mark.parametrize("text", [42, 3.5, [], ["ok", 7]])
def test_referring_pipeline_rejects_non_text(pipeline_folders, text):
    from transformers import pipeline

    segmenter = pipeline("referring-image-segmentation", model=str(pipeline_folders["referring"]))
    with pytest.raises(TypeError, match="`text`"):
        segmenter(images()[0], text=text)


def test_depth_pipeline_draws_a_constant_depth_map():
    from vpd_hf.pipelines.vision import depth_picture

    picture = depth_picture(torch.full((5, 7), 2.5))
    assert picture.size == (7, 5) and not np.asarray(picture).any()
    ramp = np.asarray(depth_picture(torch.linspace(1, 3, 7).expand(5, 7)))
    assert ramp[0, 0] == 0 and ramp[0, -1] == 255


# -- vpd-hf predict / vpd_hf.prediction ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["depth", "segmentation", "referring"])
@pytest.mark.parametrize("folders", ["pipeline_folders", "size_keeping_folders"])
def test_vpd_hf_predict_writes_the_same_files_whatever_the_batch_size(request, folders, tmp_path, capsys, task):
    """The issue's report: `--batch-size 2` moved depth by metres against `--batch-size 1`; with a size-keeping
    processor, referring masks moved at 13-16 % of the pixels."""
    from vpd_hf import cli

    pipeline_folders = request.getfixturevalue(folders)

    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(images(7)):
        image.save(folder / f"photo{index}.png")
    written = {}
    for batch_size in (1, 2, 8):
        out = tmp_path / f"out{batch_size}"
        argv = ["predict", "--task", task, "--model", str(pipeline_folders[task]), str(folder), "--output", str(out),
                "--batch-size", str(batch_size), "--no-progress"]  # fmt: skip
        if task == "referring":
            argv += ["--text", "the left box", "--text", "a red sphere"]
        assert cli.main(argv) == 0
        capsys.readouterr()
        written[batch_size] = {p.name: np.asarray(Image.open(p)).astype(np.int64) for p in sorted(out.glob("*.png"))}
    assert len(written[1]) == len(SIZES) * (2 if task != "referring" else 4)
    if task == "referring":  # masks with edges: a change of the probabilities can show
        pixels = np.concatenate([m.ravel() for name, m in written[1].items() if "mask" in name])
        assert 0.05 < float((pixels > 0).mean()) < 0.95
    for batch_size in (2, 8):
        assert written[batch_size].keys() == written[1].keys()
        for name, single in written[1].items():
            batched = written[batch_size][name]
            # 16-bit millimetres and colour maps may round the last unit differently; labels and masks are equal
            if name.endswith("_mask.png"):
                assert_same_mask(batched, single)
                continue
            tolerance = 1 if name.endswith(("depth16.png", "depth.png")) else 0
            assert np.abs(batched - single).max() <= tolerance, (batch_size, name)


# -- bf16 -----------------------------------------------------------------------------------------------------------------

BF16_BATCH_BOUND = 0.05  # the README's bound: a bf16 output moves by at most 5 % of its range with its batch


def test_bf16_batch_bound_holds_where_the_difference_shows(keeping, tmp_path):
    """CPU bf16 kernels differ by batch size: the same image twice in one batch (no padding, no grouping) moves the
    referring probabilities of the tiny model by about 0.027 of their range (`scripts/measure_precision.py`). The
    README's bound is checked on that model, where the difference is not zero; fp32 stays at float rounding."""
    from transformers import CLIPTokenizer

    from vpd_hf import VPDProcessor
    from vpd_hf.testing_utils import save_tiny_clip_tokenizer

    torch.manual_seed(0)
    model = perturb(vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config(token_length=16)), seed=2)
    tokenizer = CLIPTokenizer.from_pretrained(save_tiny_clip_tokenizer(tmp_path), model_max_length=16)
    processor = VPDProcessor(keeping, tokenizer)
    image = images(10)[0].resize((96, 96))
    centre_referring_logits(model, processor, image, "the thing on the left")

    def probabilities(net, copies, dtype):
        inputs = processor(images=[image] * copies, text=["the thing on the left"] * copies, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            outputs = net(**inputs)
        return processor.post_process_referring_segmentation(outputs)[0]["probabilities"]

    reference = probabilities(model, 1, torch.float32)
    scale = float(reference.max() - reference.min())
    assert scale > 0.05  # a prediction with a range, where a relative bound means something
    fp32_moved = float((probabilities(model, 2, torch.float32) - reference).abs().max()) / scale
    bf16 = copy.deepcopy(model).to(torch.bfloat16).use_fast_memory_format()
    alone = probabilities(bf16, 1, torch.bfloat16)
    bf16_moved = float((probabilities(bf16, 2, torch.bfloat16) - alone).abs().max()) / scale
    assert fp32_moved <= 1e-5
    print(f"bf16 batch-of-2 vs alone: {bf16_moved:.4f} of the range")
    assert 0 < bf16_moved <= BF16_BATCH_BOUND, bf16_moved
