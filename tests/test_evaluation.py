"""Scoring: the batched sliding window predicts what nnU-Net's one-tile sliding window predicts."""

from __future__ import annotations

from nnunet_helpers import run_python


def test_tiles_in_batches_give_nnunets_logits(planned_task):
    code = f"""
import torch
from nnunetv2_medseqft.evaluation.validation import ValidationSet
torch.manual_seed(0)
val = ValidationSet.load({planned_task.dataset_name!r}, {planned_task.plans_name!r}, '3d_fullres', 0)
p = val.predictor
p.list_of_parameters = [p.network.state_dict()]  # a random network: what matters is that both windows agree
assert p.tile_batch == 4, p.tile_batch  # the CPU default
forwards = []
p.network.register_forward_pre_hook(lambda m, i: forwards.append(i[0].shape[0]))
most_tiles, worst, agree = 0, 0.0, 1.0
for _, data, _, _ in val.cases:
    x = torch.nn.functional.interpolate(torch.from_numpy(data)[None], scale_factor=2)[0]  # tiny cases: one tile
    logits = {{}}
    for b in (1, 3):  # 3: the last group of tiles is a partial one
        p.tile_batch, forwards[:] = b, []
        logits[b] = p.predict_logits_from_preprocessed_data(x).float()
        assert max(forwards) == min(b, sum(forwards)), forwards
    most_tiles = max(most_tiles, sum(forwards))
    worst = max(worst, float((logits[1] - logits[3]).abs().max()))
    agree = min(agree, float((logits[1].argmax(0) == logits[3].argmax(0)).float().mean()))
print('tiles', most_tiles, 'diff', worst, 'agree', agree)
"""
    out = run_python(code, planned_task.folders).stdout.split()
    tiles, diff, agree = int(out[out.index("tiles") + 1]), float(out[out.index("diff") + 1]), float(out[-1])
    assert tiles > 3  # several groups, so grouping is exercised
    assert diff < 0.05  # float rounding in nnU-Net's half-precision accumulator, nothing else
    assert agree > 0.999
