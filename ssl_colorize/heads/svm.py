"""One-vs-rest linear SVMs on frozen features, with the cost chosen by cross-validation
(Goyal et al. 2019's VOC07 benchmark; docs/protocols.md section 5).

Per class: ``sklearn.svm.LinearSVC`` (squared hinge, L2 penalty, dual, tol 1e-4, class weight
{+1: 2, -1: 1}), trained on trainval without the class's "difficult"-only images; the cost C is chosen
from a grid by the mean average precision of stratified, unshuffled k-fold cross-validation on trainval
(``GridSearchCV``; the first best in grid order wins ties), refitted on all of trainval with it, and
scores the test set. A class with fewer positives than folds uses as many folds as it has positives;
with a single positive no cost can be cross-validated and the fallback cost is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from ssl_colorize.voc_metrics import average_precision

#: Weight of the positive class (fair_self_supervision_benchmark's svm trainer: class_weight {1: 2, -1: 1}).
POSITIVE_WEIGHT = 2.0
DEFAULT_COSTS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_MAX_ITER = 2000


def make_svm(cost: float, max_iter: int, seed: int):
    """The released benchmark's LinearSVC settings for one cost."""
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, class_weight={1: POSITIVE_WEIGHT, -1: 1.0}, loss="squared_hinge", penalty="l2",
                     dual=True, tol=1e-4, max_iter=max_iter, random_state=seed)


def parse_costs(text: str) -> list[float]:
    """``"0.1,1,10"`` -> [0.1, 1.0, 10.0]; ValueError when a value is not a positive number."""
    try:
        costs = [float(c) for c in text.split(",") if c.strip()]
    except ValueError as exc:
        raise ValueError(f"must be comma-separated numbers ({exc})") from exc
    if not costs:
        raise ValueError("needs at least one cost")
    if not all(np.isfinite(c) and c > 0 for c in costs):
        raise ValueError("every cost must be a positive number")
    return costs


def choose_cost(x: np.ndarray, y: np.ndarray, costs: Sequence[float], folds: int, fallback: float, max_iter: int,
                seed: int):
    """Cross-validate the cost grid; return (the SVM refitted on all of x with the best cost, cost, info).

    ``info`` holds the mean cross-validated AP per cost (``cv_ap``) and the number of folds, or
    ``{"fallback": True}`` when the class has too few positives (or negatives) to cross-validate.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    costs = list(costs)
    n_splits = min(folds, int((y > 0).sum()), int((y < 0).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a cost's fit stopping early is part of the search
        if n_splits < 2:
            return make_svm(fallback, max_iter, seed).fit(x, y), fallback, {"fallback": True}
        # Unshuffled folds, as cross_val_score's default; rank ties go to the first cost in the grid.
        search = GridSearchCV(make_svm(costs[0], max_iter, seed), {"C": costs}, scoring="average_precision",
                              cv=StratifiedKFold(n_splits=n_splits), refit=True, n_jobs=1)
        search.fit(x, y)
    scores = {float(c): float(s) for c, s in zip(search.cv_results_["param_C"], search.cv_results_["mean_test_score"])}
    best = float(search.best_params_["C"])
    return search.best_estimator_, best, {"cv_ap": scores, "folds": n_splits}


def train_class(c: int, x_train: np.ndarray, t_train: np.ndarray, x_test: np.ndarray, t_test: np.ndarray,
                costs: Sequence[float], folds: int, fallback: float, max_iter: int, seed: int) -> dict:
    """One class: cost by cross-validation on trainval (difficult-only images excluded), test AP.

    ``t_*`` are the devkit's labels (+1 present, 0 difficult only, -1 absent; data.voc.classification_targets).
    """
    keep = t_train[:, c] != 0
    y = t_train[keep, c].astype(np.int64)
    if (y > 0).sum() == 0 or (y < 0).sum() == 0:
        return {"ap": float("nan"), "cost": None, "reason": "no positive (or no negative) in trainval"}
    model, cost, info = choose_cost(x_train[keep], y, costs, folds, fallback, max_iter, seed)
    test_keep = t_test[:, c] != 0
    ap = average_precision(model.decision_function(x_test[test_keep]), t_test[test_keep, c] > 0)
    return {"ap": float(ap), "cost": cost, **info}


def train_all_classes(x_train: np.ndarray, t_train: np.ndarray, x_test: np.ndarray, t_test: np.ndarray,
                      costs: Sequence[float], folds: int, fallback: float, max_iter: int, seed: int, jobs: int,
                      progress: Callable | None = None) -> list[dict]:
    """``train_class`` for every class, ``jobs`` classes at a time; results in class order.

    ``progress`` wraps the iterator of finished classes (e.g. a tqdm bar), so it advances as each class
    finishes rather than as it is dispatched.
    """
    from joblib import Parallel, delayed

    classes = range(t_train.shape[1])
    finished = Parallel(n_jobs=max(1, jobs), return_as="generator")(
        delayed(train_class)(c, x_train, t_train, x_test, t_test, costs, folds, fallback, max_iter, seed)
        for c in classes
    )
    if progress is not None:
        finished = progress(finished, total=len(classes))
    return list(finished)
