"""A learnable task for the averaging question: targets made by a teacher network, plus noise.

    x ~ Normal(0, I_D),  t = f_T(x) + e,  e ~ Normal(0, sigma^2 I_O),
    f_T(x) = C_T (sigmoid(A_T x) + B_T x)

with fixed random teacher params (``init_params``, A_T scaled by ``gain`` so the sigmoids
bend: a linear map cannot fit f_T). For any predictor f, on fresh samples,

    E ||f(x) - t||^2 = E ||f(x) - f_T(x)||^2 + O sigma^2,

so O sigma^2 is the noise floor of the mean loss: the teacher itself scores it, nothing scores
less on average, and a student that learns f_T from N_train samples approaches it. A student
of the teacher's shape is trained three ways from one start: gradient descent on the mean
loss, adam on the mean loss, and the homework's average of per-sample copies (one copy per
training sample, trained on it alone by GD, then the matrices averaged). Their held-out loss
is reported over the noise floor; least squares (with an intercept) is the linear reference.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import abc_jax
from experiments import common

METHODS = ("batch_gd", "adam", "average")
LABELS = {"batch_gd": "GD on the mean loss", "adam": "adam on the mean loss",
          "average": "average of per-sample copies", "linear": "least squares (linear)"}


def noise_floor(out_dim: int, sigma: float) -> float:
    """O sigma^2: the mean loss E||f_T(x) - t||^2 of the teacher itself on fresh samples."""
    return out_dim * sigma**2


def make_task(dims: tuple[int, int, int], sigma: float, gain: float, n_train: int,
              n_test: int, seed: int) -> dict[str, Any]:
    """Teacher params, training and held-out ``Batch``es (float64) and the student's start."""
    D, H, O = dims
    kt, ks, ktr, kte = jax.random.split(jax.random.key(seed), 4)
    teacher = abc_jax.init_params(kt, D, H, O, dtype=jnp.float64)
    teacher = teacher._replace(A=gain * teacher.A)

    def sample(key: jax.Array, n: int) -> abc_jax.Batch:
        kx, ke = jax.random.split(key)
        X = jax.random.normal(kx, (n, D), jnp.float64)
        noise = sigma * jax.random.normal(ke, (n, O), jnp.float64)
        return abc_jax.Batch(X, T=abc_jax.predict(teacher, X) + noise)

    return {"teacher": teacher, "train": sample(ktr, n_train), "test": sample(kte, n_test),
            "start": abc_jax.init_params(ks, D, H, O, dtype=jnp.float64),
            "floor": noise_floor(O, sigma)}


def per_sample_average(start: abc_jax.Params, data: abc_jax.Batch, lr: float,
                       epochs: int) -> abc_jax.Params:
    """The homework's average: copy i trained by GD on (X[i], T[i]) alone, then the mean."""
    copies = abc_jax.train_per_sample(start, data, lr=lr, epochs=epochs, progress=False)
    return abc_jax.Params(*(jnp.mean(p, axis=0) for p in copies.params))


def linear_loss(task: dict[str, Any]) -> float:
    """Held-out loss of least squares t ~ W [x, 1] fitted on the training rows."""
    def design(X: Any) -> np.ndarray:
        return np.c_[np.asarray(X), np.ones(X.shape[0])]

    tr, te = task["train"], task["test"]
    W = np.linalg.lstsq(design(tr.X), np.asarray(tr.T), rcond=None)[0]
    return float(np.mean(np.sum((design(te.X) @ W - np.asarray(te.T)) ** 2, axis=1)))


def run_teacher(dims: tuple[int, int, int], sigma: float, gain: float, n_train: int,
                n_test: int, epochs: int, lr: float, adam_lr: float, ps_lr: float,
                ps_epochs: int, seed: int = 0, n_evals: int = 100) -> dict[str, Any]:
    """The three students' held-out curves (GD, adam) and final held-out losses over the floor."""
    task = make_task(dims, sigma, gain, n_train, n_test, seed)
    every = max(1, epochs // n_evals)
    curves, final = {}, {}
    for m, opt in (("batch_gd", None), ("adam", optax.adam(adam_lr))):
        res = abc_jax.train(task["start"], task["train"], lr=lr if opt is None else None,
                            optimizer=opt, epochs=epochs, epochs_per_chunk=every, eval_every=every,
                            eval_data=task["test"], progress=False)
        curves[m] = {"epochs": np.asarray(res.eval_epochs).tolist(),
                     "heldout": np.asarray(res.eval_losses).tolist(),
                     "train": np.asarray(res.losses).tolist()}
        final[m] = curves[m]["heldout"][-1]
    avg = per_sample_average(task["start"], task["train"], ps_lr, ps_epochs)
    final["average"] = float(abc_jax.batch_loss(avg, task["test"]))
    final["linear"] = linear_loss(task)
    floor = task["floor"]
    return {"config": dict(dims=list(dims), sigma=sigma, gain=gain, n_train=n_train,
                           n_test=n_test, epochs=epochs, lr=lr, adam_lr=adam_lr,
                           per_sample_lr=ps_lr, per_sample_epochs=ps_epochs, seed=seed),
            "noise_floor": floor,
            "teacher_heldout": float(abc_jax.batch_loss(task["teacher"], task["test"])),
            "start_heldout": float(abc_jax.batch_loss(task["start"], task["test"])),
            "heldout": final, "ratio": {m: v / floor for m, v in final.items()},
            "curves": curves}


def summary_rows(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per method and the references: held-out loss and its ratio to the floor."""
    floor = res["noise_floor"]
    rows = [["teacher itself", res["teacher_heldout"], res["teacher_heldout"] / floor],
            ["student at the start", res["start_heldout"], res["start_heldout"] / floor]]
    rows += [[LABELS[m], res["heldout"][m], res["ratio"][m]] for m in (*METHODS, "linear")]
    return ["method", "held-out loss", "/ noise floor"], rows


def conclusion(res: dict[str, Any], within: float = 0.10) -> str:
    """Whether GD on the mean loss reached the noise floor (within ``within``), in one line."""
    r = res["ratio"]
    reached = "within" if r["batch_gd"] <= 1 + within else "not within"
    return (f"GD on the mean loss: held-out / noise floor = {r['batch_gd']:.3f} ({reached} "
            f"{100 * within:.0f}% of the floor {res['noise_floor']:.4g}); adam {r['adam']:.3f}; "
            f"the average of per-sample copies {r['average']:.3g}; least squares "
            f"{r['linear']:.3f}.")


def curve_rows(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    return ["method", "epoch", "heldout_loss", "heldout_over_floor"], [
        [m, e, h, h / res["noise_floor"]] for m, c in res["curves"].items()
        for e, h in zip(c["epochs"], c["heldout"], strict=True)]


def plot(res: dict[str, Any]) -> Any:
    """Held-out loss against epochs with the noise floor; final held-out / floor per method."""
    fig, (ax, bars) = common.figure(ncols=2, width=5.2, height=4.0)
    colors = {"batch_gd": "C0", "adam": "C2", "average": "C3", "linear": "C7"}
    for m, c in res["curves"].items():
        ax.plot(c["epochs"][1:], c["heldout"][1:], "o-", ms=2, color=colors[m], label=LABELS[m])
    ax.axhline(res["heldout"]["average"], color=colors["average"], ls=":",
               label=LABELS["average"] + " (end)")
    ax.axhline(res["heldout"]["linear"], color=colors["linear"], ls="-.", label=LABELS["linear"])
    ax.axhline(res["noise_floor"], color="k", ls="--", lw=1, label=r"noise floor $O\sigma^2$")
    ax.axhline(1.1 * res["noise_floor"], color="k", ls=":", lw=0.8, label="floor + 10%")
    ax.set(xscale="log", yscale="log", xlabel="epoch", ylabel="held-out loss (fresh samples)",
           title="Student of a teacher network")
    ax.legend(fontsize=7)
    names = [*METHODS, "linear"]
    ratios = [res["ratio"][m] for m in names]
    bars.bar(range(len(names)), ratios, color=[colors[m] for m in names], alpha=0.7)
    for i, v in enumerate(ratios):
        bars.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    bars.axhline(1.0, color="k", ls="--", lw=1)
    bars.set_xticks(range(len(names)), [LABELS[m].replace(" on the", "\non the")
                                        .replace(" of per", "\nof per").replace(" (", "\n(")
                                        for m in names], fontsize=7)
    bars.set(yscale="log", ylabel="final held-out loss / noise floor",
             title="Final held-out loss over the floor")
    c = res["config"]
    fig.suptitle(f"teacher D, H, O = {tuple(c['dims'])}, gain {c['gain']:g}, "
                 rf"$\sigma$ = {c['sigma']:g}, N_train = {c['n_train']}, {c['epochs']} epochs "
                 f"(GD lr {c['lr']:g}), float64",
                 fontsize=10)
    return fig
