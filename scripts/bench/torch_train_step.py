"""The stage-2 training step of handid's train_throughput example, in PyTorch.

Same architecture (open_clip ViT-B-16-quickgelu / RN50 with random weights,
i.e. OpenAI CLIP's layout and activation), same head (BNNeck with a frozen
bias, ArcFace s=30 m=0.5), same losses (cross-entropy with label smoothing
0.1, batch-hard triplet margin 0.3 on the raw feature, center loss with its
own SGD at lr 0.5, SupCon T=0.07 weight 0.5 on the normalised feature), same
optimizer (Adam lr 5e-6, L2 weight decay 1e-4), same batch (K = 2 images per
person) and random pixels. Prints `python batch=B images_per_s=X`.
"""
import argparse
import math
import resource
import time

import open_clip
import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--arch", default="vit_b16")
p.add_argument("--device", default="cpu")
p.add_argument("--batches", default="2,8")
p.add_argument("--seconds", type=float, default=30)
args = p.parse_args()

name = {"vit_b16": "ViT-B-16-quickgelu", "rn50": "RN50-quickgelu"}[args.arch]
dev = torch.device(args.device)
torch.manual_seed(0)
model = open_clip.create_model(name, pretrained=None).to(dev)
visual = model.visual
visual.train()
for q in model.parameters():
    q.requires_grad_(False)
for q in visual.parameters():
    q.requires_grad_(True)
dim, classes = model.visual.output_dim, 100
neck = torch.nn.BatchNorm1d(dim).to(dev)
neck.bias.requires_grad_(False)
arc_w = torch.nn.Parameter(torch.empty(classes, dim, device=dev))
torch.nn.init.xavier_uniform_(arc_w)
centers = torch.nn.Parameter(torch.randn(classes, dim, device=dev))
params = [q for q in visual.parameters()] + [neck.weight, arc_w]
opt = torch.optim.Adam(params, lr=5e-6, weight_decay=1e-4)
opt_center = torch.optim.SGD([centers], lr=0.5)
size = 224


def arcface(x, y, s=30.0, m=0.5):
    cos = F.normalize(x) @ F.normalize(arc_w).t()
    sin = (1.0 - cos.pow(2)).clamp(0, 1).sqrt()
    phi = cos * math.cos(m) - sin * math.sin(m)
    phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
    one_hot = F.one_hot(y, classes).to(cos.dtype)
    return s * (one_hot * phi + (1 - one_hot) * cos)


def triplet(x, y, margin=0.3):
    xx = x.pow(2).sum(1, keepdim=True)
    d = (xx + xx.t() - 2 * x @ x.t()).clamp_min(1e-12).sqrt()
    same = y[:, None] == y[None, :]
    ap = d.masked_fill(~same, float("-inf")).amax(1)
    an = d.masked_fill(same, float("inf")).amin(1)
    return F.relu(ap - an + margin).mean()


def sup_con(x, y, t=0.07):
    n = x.shape[0]
    not_self = 1 - torch.eye(n, device=x.device)
    mask = (y[:, None] == y[None, :]).float() * not_self
    logits = x @ x.t() / t
    logits = logits - logits.amax(1, keepdim=True).detach()
    log_prob = logits - (logits.exp() * not_self).sum(1, keepdim=True).log()
    per = (mask * log_prob).sum(1) / mask.sum(1).clamp_min(1)
    return -per[mask.sum(1) > 0].mean()


print(f"# PyTorch {torch.__version__} stage-2 train step, {name} at {size}x{size}, {dev}, "
      f"{torch.get_num_threads()} threads")
for batch in [int(b) for b in args.batches.split(",")]:
    y = torch.arange(batch, device=dev) // 2
    x = torch.randn(batch, 3, size, size, device=dev)

    def step():
        opt.zero_grad()
        opt_center.zero_grad()
        f = visual(x)
        logits = arcface(neck(f), y)
        center = (f - centers[y]).pow(2).sum(1).clamp(1e-12, 1e12).sum() / batch
        loss = (F.cross_entropy(logits, y, label_smoothing=0.1) + triplet(f, y)
                + 0.0005 * center + 0.5 * sup_con(F.normalize(f), y))
        loss.backward()
        opt.step()
        centers.grad.mul_(1 / 0.0005)
        opt_center.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    start, steps, best = time.perf_counter(), 0, float("inf")
    while steps < 2 or time.perf_counter() - start < args.seconds:
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
        steps += 1
    el = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"python batch={batch} images_per_s={steps * batch / el:.3f} step_s={el / steps:.3f} "
          f"best_step_s={best:.3f} first_step_s={first:.3f} peak_rss_mib={peak:.0f}")
