"""Measured quality of a digits MAR against the real data (needs scikit-learn).

    python -m marfast.recipes.digits_quality [--model digits] [--per-class 20] [--cfg ...]

Three measures, all fitted on the TRAINING split only (the held-out split is only compared to):
- accuracy: a logistic-regression classifier on the 64 pixels recognises generated digits as
  their conditioning class;
- coverage: the classes that classifier assigns to unconditional samples (cfg 1, no label);
- Fréchet distance (FD) between generated and held-out digits in the space of the first
  `PCA_COMPONENTS` principal components of the training pixels, next to reference values at the
  same sample size: real training digits (the floor), and blurred and noisy real training digits.
"""
import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .digits import NUM_CLASSES, digits_split

PCA_COMPONENTS = 20
DEFAULT_CFG = 2.0
DEFAULT_NUM_ITER = 8
BLUR_KERNEL = (0.25, 0.5, 0.25)  # separable binomial 3 x 3 blur
NOISE_STD = 96.0  # pixel noise (of 255) added to real digits for the noisy reference


def pixels(images):
    """uint8 images [N, 8, 8] -> float64 array [N, 64] in [0, 1]."""
    return torch.as_tensor(images).reshape(len(images), -1).double().div(255.0).numpy()


class DigitsJudge:
    """Classifier and feature space fitted on the training split of `digits_split()`."""

    def __init__(self, split=None):
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        self.split = split if split is not None else digits_split()
        train_x = pixels(self.split.train_images)
        train_y = self.split.train_labels.numpy()
        self.classifier = LogisticRegression(max_iter=5000).fit(train_x, train_y)
        self.pca = PCA(n_components=PCA_COMPONENTS, random_state=0).fit(train_x)

    def predict(self, images):
        """Predicted classes, int array [N]."""
        return self.classifier.predict(pixels(images))

    def heldout_accuracy(self):
        """Accuracy of the classifier on the real held-out digits (its ceiling on generated ones)."""
        return float((self.predict(self.split.heldout_images) == self.split.heldout_labels.numpy()).mean())

    def features(self, images):
        return self.pca.transform(pixels(images))

    def fd_to_heldout(self, images):
        """Fréchet distance between `images` and all held-out digits in the PCA feature space."""
        return frechet_distance(self.features(images), self.features(self.split.heldout_images))

    def stratified_train_subset(self, per_class, seed=0):
        """`per_class` real training images of each class (seeded), uint8 [10 * per_class, 8, 8]."""
        generator = torch.Generator().manual_seed(seed)
        picks = []
        for cls in range(NUM_CLASSES):
            idx = (self.split.train_labels == cls).nonzero().squeeze(1)
            picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
        return self.split.train_images[torch.cat(picks)]

    def reference_distances(self, per_class, seed=0):
        """FD to the held-out digits of real, blurred and noisy training digits (10 * per_class each)."""
        real = self.stratified_train_subset(per_class, seed)
        generator = torch.Generator().manual_seed(seed)
        noisy = (real.double() + NOISE_STD * torch.randn(real.shape, generator=generator, dtype=torch.float64))
        return {
            "real_train": self.fd_to_heldout(real),
            "blurred_train": self.fd_to_heldout(blur(real)),
            "noisy_train": self.fd_to_heldout(noisy.clamp(0, 255).round().to(torch.uint8)),
        }


def blur(images):
    """3 x 3 binomial blur of uint8 images [N, H, W] (zero padding), uint8."""
    kernel_1d = torch.tensor(BLUR_KERNEL, dtype=torch.float64)
    kernel = (kernel_1d[:, None] * kernel_1d[None, :])[None, None]
    blurred = F.conv2d(images.double().unsqueeze(1), kernel, padding=1).squeeze(1)
    return blurred.round().clamp(0, 255).to(torch.uint8)


def frechet_distance(features_a, features_b):
    """Squared Fréchet distance between Gaussians fitted to two feature sets [N, D] (float64).

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), with symmetric
    eigendecompositions (negative round-off eigenvalues are clipped to 0).
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets [N, D] with the same D and N >= 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigval_a, eigvec_a = np.linalg.eigh(cov_a)
    sqrt_a = (eigvec_a * np.sqrt(np.clip(eigval_a, 0, None))) @ eigvec_a.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def sample_unconditional(model, count, num_iter, seed, temperature=1.0):
    """`count` unconditional samples (cfg 1, the fake class latent): uint8 images."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    model.eval()
    latents = model.sample_tokens(count, num_iter, cfg=1.0, labels=None, temperature=temperature, generator=generator)
    return model.tokenizer.decode(latents)


def evaluate(model, judge, per_class=20, cfg=DEFAULT_CFG, num_iter=DEFAULT_NUM_ITER, temperature=1.0,
             unconditional=100, seed=0):
    """Quality numbers of `model` (a dict; see the module docstring)."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    start = time.perf_counter()
    images = model.sample(labels, num_iter=num_iter, cfg=cfg, temperature=temperature, seed=seed, progress=False)
    conditional_seconds = time.perf_counter() - start
    predicted = judge.predict(images)
    per_class_accuracy = [float((predicted[labels.numpy() == c] == c).mean()) for c in range(NUM_CLASSES)]
    metrics = dict(
        per_class=per_class, cfg=cfg, num_iter=num_iter, temperature=temperature, seed=seed,
        accuracy=float((predicted == labels.numpy()).mean()), per_class_accuracy=per_class_accuracy,
        conditional_seconds=conditional_seconds, fd_generated=judge.fd_to_heldout(images),
        classifier_heldout_accuracy=judge.heldout_accuracy(),
        fd_reference=judge.reference_distances(per_class, seed),
    )
    if unconditional:
        start = time.perf_counter()
        uncond = sample_unconditional(model, unconditional, num_iter, seed + 1, temperature)
        metrics["unconditional_seconds"] = time.perf_counter() - start
        metrics["unconditional_class_counts"] = np.bincount(judge.predict(uncond), minlength=NUM_CLASSES).tolist()
        metrics["unconditional_fd"] = judge.fd_to_heldout(uncond)
    return metrics


def format_metrics(m):
    ref = m["fd_reference"]
    lines = [
        f"conditional: {NUM_CLASSES} x {m['per_class']} samples, cfg {m['cfg']}, {m['num_iter']} AR steps, "
        f"temperature {m['temperature']}, seed {m['seed']}: {m['conditional_seconds']:.1f} s",
        f"  classifier accuracy on generated digits: {m['accuracy']:.3f} "
        f"(on real held-out digits: {m['classifier_heldout_accuracy']:.3f})",
        "  per class: " + " ".join(f"{c}:{a:.2f}" for c, a in enumerate(m["per_class_accuracy"])),
        f"  FD to held-out (PCA-{PCA_COMPONENTS}): generated {m['fd_generated']:.2f}; real train "
        f"{ref['real_train']:.2f}, blurred train {ref['blurred_train']:.2f}, noisy train {ref['noisy_train']:.2f}",
    ]
    if "unconditional_class_counts" in m:
        counts = m["unconditional_class_counts"]
        lines.append(f"unconditional: {sum(counts)} samples in {m['unconditional_seconds']:.1f} s, "
                     f"classes covered {sum(c > 0 for c in counts)}/{NUM_CLASSES}, counts {counts}, "
                     f"FD {m['unconditional_fd']:.2f}")
    return "\n".join(lines)


def main(argv=None):
    from ..mar import MAR

    parser = argparse.ArgumentParser(prog="python -m marfast.recipes.digits_quality",
                                     description="Measure a digits MAR against the real digits.")
    parser.add_argument("--model", default="digits", help="anything MAR.load accepts (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    parser.add_argument("--num-iter", type=int, default=DEFAULT_NUM_ITER)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--unconditional", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = MAR.load(args.model)
    judge = DigitsJudge()
    print(format_metrics(evaluate(model, judge, args.per_class, args.cfg, args.num_iter, args.temperature,
                                  args.unconditional, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
