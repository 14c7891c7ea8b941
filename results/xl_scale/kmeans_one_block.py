import os, sys, time
import torch
sys.path.insert(0, ".")
torch.set_num_threads(1)
from vq4dit.kmeans import kmeans
from vq4dit.testbed.xl import make_xl_transformer
m = make_xl_transformer(num_layers=1)
from vq4dit.naming import default_filter
tot = 0.0
for n, lin in m.named_modules():
    if default_filter(lin, n):
        x = lin.weight.detach().reshape(-1, 4)
        t = time.time(); c, a = kmeans(x, 256, 100, seed=0); dt = time.time() - t
        tot += dt
        print(f"{n} {tuple(lin.weight.shape)} S={len(x)} {dt:.2f}s load={os.getloadavg()[0]:.1f}", flush=True)
print(f"one block (7 layers) {tot:.1f}s -> x28 = {tot*28/60:.1f} min (1 thread)", flush=True)
