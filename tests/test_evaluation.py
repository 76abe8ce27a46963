"""Scoring: the batched sliding window predicts what nnU-Net's one-tile sliding window predicts; weights scored
before are not predicted again."""

from __future__ import annotations

import json

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


def test_weights_scored_before_are_not_predicted_again(planned_task, tmp_path):
    code = f"""
import json, os, torch
from nnunetv2_medseqft.evaluation.validation import ValidationSet

def load():
    val = ValidationSet.load({planned_task.dataset_name!r}, {planned_task.plans_name!r}, '3d_fullres', 0)
    val.predictor.network.register_forward_pre_hook(lambda m, i: forwards.append(1))
    return val

def forwards_of(val, weights, **kw):
    forwards[:] = []
    return val.score(weights, **kw), len(forwards)

forwards, out = [], {{}}
torch.manual_seed(0)
val = load()
w = {{k: v.clone() for k, v in val.predictor.network.state_dict().items()}}
first, out['first'] = forwards_of(val, w)
again, out['again'] = forwards_of(val, w)
out['same'] = again == first
other, out['other_process'] = forwards_of(load(), w)  # another run's process finds it
out['same_other'] = other == first
head = next(k for k in w if '.seg_layers.' in k)
_, out['other_head'] = forwards_of(val, {{**w, head: w[head] + 0.1}})
p1, p2 = {str(tmp_path / 'a' / 'o.npz')!r}, {str(tmp_path / 'b' / 'o.npz')!r}
_, out['overlay_first'] = forwards_of(val, w, overlay=p1)  # kept without its overlay: drawn now
_, out['overlay_again'] = forwards_of(val, w, overlay=p2)
out['overlay_copied'] = os.path.isfile(p1) and open(p1, 'rb').read() == open(p2, 'rb').read()
gt = os.path.join(os.environ['nnUNet_preprocessed'], {planned_task.dataset_name!r}, 'gt_segmentations',
                  val.cases[0][0] + '.nii.gz')
st = os.stat(gt)
os.utime(gt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # preprocessed again: scored again
_, out['newer_gt'] = forwards_of(load(), w)
print(json.dumps(out))
"""
    out = json.loads(run_python(code, planned_task.folders).stdout.strip().splitlines()[-1])
    assert out["first"] > 0 and out["again"] == 0 and out["same"]
    assert out["other_process"] == 0 and out["same_other"]
    assert out["other_head"] > 0
    assert out["overlay_first"] > 0 and out["overlay_again"] == 0 and out["overlay_copied"]
    assert out["newer_gt"] > 0
