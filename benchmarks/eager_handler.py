"""Baseline for `serve_load.py`: the plain torch-eager TorchServe handler most users would write.

EfficientNet-Lite0 from timm (same architecture and input size as the default model; weights are random because only
speed is measured), PIL decode, torchvision transforms, `torch.inference_mode()`, batch = TorchServe's batch. One raw
image per request. A benchmark artifact only: the product's serving code never imports torch.
"""

import io
import json
import os

import torch
from PIL import Image

_state = {}


def _initialize(context):
    import timm
    from torchvision import transforms

    model_dir = context.system_properties.get("model_dir")
    with open(os.path.join(model_dir, "model.json")) as fh:
        card = json.load(fh)
    size = int(card["input_size"])
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=int(card["k"]))
    model.eval()
    _state["model"] = model
    _state["transform"] = transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    _state["names"] = card.get("class_names")
    with torch.inference_mode():
        model(torch.zeros(8, 3, size, size))


def handle(data, context):
    if "model" not in _state:
        _initialize(context)
    if data is None:
        return None
    tensors, ok = [], []
    for row in data:
        body = row.get("body") or row.get("data")
        try:
            tensors.append(_state["transform"](Image.open(io.BytesIO(body)).convert("RGB")))
            ok.append(True)
        except Exception:
            ok.append(False)
    out = []
    if tensors:
        with torch.inference_mode():
            probs = torch.softmax(_state["model"](torch.stack(tensors)), dim=1)
        conf, cluster = probs.max(dim=1)
        results = iter(zip(cluster.tolist(), conf.tolist(), strict=True))
    for good in ok:
        if good:
            c, p = next(results)
            out.append([{"cluster": c, "confidence": p, "label": None}])
        else:
            out.append([{"error": {"code": "decode_error", "message": "bad image"}}])
    return out
