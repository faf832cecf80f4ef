"""A local Gradio app for the three VPD tasks (`pip install "vpd-hf[demo]"`, then `vpd-hf demo --depth-model ...`).

The work is done by small functions of (predictor, inputs) -> picture, which the app wires to its widgets and which
can be called without Gradio (and are, in the tests).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .prediction import Predictor
from .visualization import colorize_depth, overlay_mask, overlay_segmentation

TITLE = "VPD: visual perception with a pre-trained diffusion model"


def _rgb(image: Any) -> Image.Image:
    if image is None:
        raise ValueError("Upload an image first.")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"`image` must be a PIL image or an array, got {type(image).__name__}.")
    return image.convert("RGB")


def predict_depth(predictor: Predictor, image: Any) -> tuple[Image.Image, str]:
    """Colour depth map (near = bright) and a one-line summary of the metric range."""
    depth = predictor.predict([_rgb(image)])[0]
    return colorize_depth(depth), f"depth {float(depth.min()):.2f} - {float(depth.max()):.2f} m"


def predict_segmentation(predictor: Predictor, image: Any) -> tuple[Image.Image, str]:
    """Palette overlay with a legend, and the classes found (largest first)."""
    image = _rgb(image)
    labels = predictor.predict([image])[0].numpy()
    id2label = predictor.model.config.id2label
    overlay = overlay_segmentation(image, labels, id2label)
    values, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts)
    found = ", ".join(f"{id2label.get(int(values[i]), values[i])} {100 * counts[i] / labels.size:.0f}%" for i in order)
    return overlay, found


def predict_referring(predictor: Predictor, image: Any, text: str) -> tuple[Image.Image, str]:
    """The referred object's mask over the image, and its share of the picture."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("Type an expression describing one object, e.g. 'the red chair on the left'.")
    image = _rgb(image)
    mask = predictor.predict([image], [[text.strip()]])[0][0].numpy()
    return overlay_mask(image, mask, caption=text.strip()), f"mask covers {100 * mask.mean():.1f}% of the image"


def build_demo(
    depth_model: str | None = None,
    segmentation_model: str | None = None,
    referring_model: str | None = None,
    device: str | None = None,
) -> Any:
    """A `gradio.Blocks` app with one tab per given model (folder or Hub id)."""
    try:
        import gradio as gr
    except ImportError as error:  # an optional extra
        raise ImportError('The demo needs Gradio: pip install "vpd-hf[demo]"') from error
    models = {"depth": depth_model, "segmentation": segmentation_model, "referring": referring_model}
    if not any(models.values()):
        raise ValueError("Give at least one of `depth_model`, `segmentation_model`, `referring_model`.")
    predictors = {task: Predictor(task, source, device) for task, source in models.items() if source}

    def guarded(function, predictor):
        def run(*inputs):
            try:
                return function(predictor, *inputs)
            except (TypeError, ValueError) as error:
                raise gr.Error(str(error)) from error

        return run

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nOne UNet pass of Stable Diffusion per image, features read by a task head.")
        if "depth" in predictors:
            with gr.Tab("Depth"):
                image = gr.Image(type="pil", label="image")
                button = gr.Button("Estimate depth")
                output, info = gr.Image(label="depth (near = bright)"), gr.Textbox(label="range")
                button.click(guarded(predict_depth, predictors["depth"]), [image], [output, info], api_name="depth")
        if "segmentation" in predictors:
            with gr.Tab("Segmentation"):
                image = gr.Image(type="pil", label="image")
                button = gr.Button("Segment")
                output, info = gr.Image(label="classes"), gr.Textbox(label="found")
                button.click(guarded(predict_segmentation, predictors["segmentation"]), [image], [output, info],
                             api_name="segmentation")  # fmt: skip
        if "referring" in predictors:
            with gr.Tab("Referring segmentation"):
                image = gr.Image(type="pil", label="image")
                text = gr.Textbox(label="expression", placeholder="the red chair on the left")
                button = gr.Button("Find it")
                output, info = gr.Image(label="mask"), gr.Textbox(label="mask size")
                button.click(guarded(predict_referring, predictors["referring"]), [image, text], [output, info],
                             api_name="referring")  # fmt: skip
    return demo


def launch(
    depth_model: str | None = None,
    segmentation_model: str | None = None,
    referring_model: str | None = None,
    device: str | None = None,
    **launch_kwargs: Any,
) -> None:
    """Builds the app and serves it locally (`launch_kwargs` go to `gradio.Blocks.launch`, e.g. `server_port`)."""
    build_demo(depth_model, segmentation_model, referring_model, device).launch(**launch_kwargs)


__all__ = ["build_demo", "launch", "predict_depth", "predict_referring", "predict_segmentation"]
