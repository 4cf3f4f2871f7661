"""An evaluated ensemble as one MLflow pyfunc model: image bytes in, averaged softmax and top-5 classes out.

It does the preprocessing itself (decode by content, shorter side to the stored size, central square, the mean
image, the members' test views), so `mlflow models serve` answers on raw JPEGs. Its artifacts: each member's
checkpoint, the mean image, and `ensemble.json` (stored size, crops, classes with names, the members).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

TOP = 5


class EnsembleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from alexnet.checkpoints import read_state
        from alexnet.config import TrainConfig
        from alexnet.inference import MemberModel
        from alexnet.members import Member

        spec = json.loads(Path(context.artifacts["ensemble"]).read_text())
        mean = np.load(context.artifacts["mean_image"])
        self.size, self.crops, self.classes = spec["size"], spec["crops"], spec["classes"]
        self.members = []
        for i, m in enumerate(spec["members"]):
            path = context.artifacts[f"member{i}"]
            member = Member(m["run_id"], m["name"], path, TrainConfig.from_dict(read_state(path)["config"]),
                            len(self.classes), m["pretrained"])
            self.members.append(MemberModel(member, mean, self.size))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One row per image: `probabilities` (averaged softmax), `top5` ({wnid, name, probability} x 5), `error`
        (why an image could not be read; its other columns are then empty)."""
        from alexnet.imaging import BadImage, decode_rgb, resize_center_crop

        pixels, errors = [], []
        for value in model_input["image"]:
            try:
                data = base64.b64decode(value) if isinstance(value, str) else bytes(value)
                pixels.append(resize_center_crop(decode_rgb(data, self.size), self.size))
                errors.append("")
            except (BadImage, ValueError, TypeError) as err:
                pixels.append(None)
                errors.append(str(err) or type(err).__name__)
        good = [i for i, p in enumerate(pixels) if p is not None]
        probs = np.zeros((len(pixels), len(self.classes)), np.float32)
        if good:
            batch = np.stack([pixels[i] for i in good]).transpose(0, 3, 1, 2)  # (N, 3, S, S) uint8
            probs[good] = np.mean([m.probs(batch, self.crops) for m in self.members], axis=0)
        rows = {"probabilities": [], "top5": [], "error": errors}
        for i, p in enumerate(probs):
            top = np.argsort(-p)[:TOP] if not errors[i] else []
            rows["probabilities"].append(p.tolist() if not errors[i] else None)
            rows["top5"].append([{"wnid": self.classes[k]["wnid"], "name": self.classes[k]["name"],
                                  "probability": float(p[k])} for k in top])
        return pd.DataFrame(rows)


def ensemble_artifacts(members, prepared, crops: str, folder: Path) -> dict[str, str]:
    """The files the model carries, written into `folder`: {artifact name: local path}."""
    from alexnet.checkpoints import CHECKPOINT_FILE, read_state

    folder.mkdir(parents=True, exist_ok=True)
    spec = {"size": prepared.size, "crops": crops,
            "classes": [{"wnid": w, "name": n} for w, n in zip(prepared.wnids, prepared.class_names())],
            "members": [{"run_id": m.run_id, "name": m.name, "pretrained": m.pretrained} for m in members]}
    (folder / "ensemble.json").write_text(json.dumps(spec, indent=1))
    np.save(folder / "mean_image.npy", prepared.mean_image)
    artifacts = {"ensemble": str(folder / "ensemble.json"), "mean_image": str(folder / "mean_image.npy")}
    import torch

    for i, m in enumerate(members):  # the weights and config alone, wherever the checkpoint lived
        state = read_state(m.checkpoint)
        path = folder / f"member{i}-{CHECKPOINT_FILE}"
        torch.save({"model": state["model"], "config": state["config"]}, path)
        artifacts[f"member{i}"] = str(path)
    return artifacts
