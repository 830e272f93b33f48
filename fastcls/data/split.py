"""Reproducible splits: the validation split (random, stratified, grouped or given), k folds, stratified subsets."""

__all__ = ["assign_split", "assign_folds", "sample_items"]

import warnings
from typing import Optional

import numpy as np
import pandas as pd
from sklearn.model_selection import (GroupShuffleSplit, KFold, StratifiedGroupKFold, StratifiedKFold,
                                     train_test_split)

from ..errors import FastclsError
from ..recipe import Recipe


def assign_split(train: pd.DataFrame, recipe: Recipe, seed: int) -> pd.DataFrame:
    """A copy of `train` with a boolean `is_valid` column, reproducible for a given seed."""
    df = train.copy()
    if recipe.split == "auto":
        recipe = recipe.override(split="given" if "is_valid" in df else "stratified")
    if recipe.split == "given":
        if "is_valid" not in df:
            raise FastclsError(f"Recipe {recipe.name!r} uses the given split but its items have no 'is_valid' column.")
        df["is_valid"] = df["is_valid"].astype(bool)
        return df
    n = len(df)
    idx = np.arange(n)
    if recipe.split == "group":
        if "group" not in df:
            raise FastclsError(f"Recipe {recipe.name!r} splits by group but its items have no group column.")
        n_groups = df["group"].nunique()
        k = max(2, round(1 / recipe.valid_pct))
        if n_groups < k:
            raise FastclsError(f"Recipe {recipe.name!r}: only {n_groups} groups, too few for a {recipe.valid_pct:.0%} "
                               "grouped validation split.")
        try:
            sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            _, valid = next(sgkf.split(idx, df["label"], df["group"]))
        except ValueError:
            gss = GroupShuffleSplit(1, test_size=recipe.valid_pct, random_state=seed)
            _, valid = next(gss.split(idx, groups=df["group"]))
    else:
        counts = df["label"].value_counts()
        stratify = df["label"] if recipe.split == "stratified" and counts.min() >= 2 else None
        n_valid = max(int(round(n * recipe.valid_pct)), counts.size if stratify is not None else 1)
        _, valid = train_test_split(idx, test_size=n_valid, random_state=seed, stratify=stratify)
    df["is_valid"] = False
    df.loc[df.index[np.sort(valid)], "is_valid"] = True
    return df


def assign_folds(train: pd.DataFrame, recipe: Recipe, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each row of `train`: stratified by label, grouped when the recipe splits by group.

    Depends only on the rows (labels, groups), `k` and `seed`, never on the arch, so every arch's folds agree and
    their out-of-fold predictions can be ensembled or stacked. A recipe with a given split is folded over all rows.
    """
    if k < 2:
        raise FastclsError(f"--folds must be at least 2, got {k}.")
    if len(train) < k:
        raise FastclsError(f"Recipe {recipe.name!r}: {len(train)} training items, too few for {k} folds.")
    idx, y = np.arange(len(train)), train["label"].astype(str).to_numpy()
    with warnings.catch_warnings():  # classes rarer than k: sklearn warns and spreads them as it can
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        if recipe.split == "group":
            if "group" not in train:
                raise FastclsError(f"Recipe {recipe.name!r} splits by group but its items have no group column.")
            n_groups = train["group"].nunique()
            if n_groups < k:
                raise FastclsError(f"Recipe {recipe.name!r}: its items make only {n_groups} groups "
                                   f"({recipe.group_col or 'group'}), fewer than --folds {k}; no group may cross "
                                   f"folds. Use --folds {n_groups} or fewer.")
            splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, y, train["group"])
        elif pd.Series(y).value_counts().min() >= 2:
            splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, y)
        else:  # a class with one item cannot be stratified
            splits = KFold(n_splits=k, shuffle=True, random_state=seed).split(idx)
        fold = np.full(len(train), -1, dtype=np.int64)
        for i, (_, held) in enumerate(splits):
            fold[held] = i
    return fold


def sample_items(train: pd.DataFrame, n: Optional[int], seed: int) -> pd.DataFrame:
    """A stratified subset of `n` training items (every class kept where n allows), for quick checks; all of them
    when `n` is None (no --sample)."""
    if n is None or n >= len(train):
        return train
    counts = train["label"].value_counts()
    strat = train["label"] if counts.min() >= 2 and n >= 2 * counts.size else None
    keep, _ = train_test_split(np.arange(len(train)), train_size=n, random_state=seed, stratify=strat)
    return train.iloc[np.sort(keep)].reset_index(drop=True)
