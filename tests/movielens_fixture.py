"""A small MovieLens-1M-shaped release (ratings.dat, users.dat, movies.dat) with learnable taste:
each user loves one genre (rates its movies 4-5) and dislikes the rest (1-2), so a retrieval
model that learns users' genres beats popularity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def write_ml1m_like(directory: Path, users: int = 300, movies: int = 120, per_user: int = 30,
                    seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    movie_genre = rng.integers(0, len(GENRES), movies)
    (directory / "movies.dat").write_text("".join(
        f"{m + 1}::Movie {m + 1} ({1980 + m % 20})::{GENRES[g]}\n" for m, g in enumerate(movie_genre)))
    taste = rng.integers(0, len(GENRES), users)
    (directory / "users.dat").write_text("".join(
        f"{u + 1}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 21}::{10000 + u % 50}\n" for u in range(users)))
    lines = []
    for u in range(users):
        for m in rng.choice(movies, per_user, replace=False):
            rating = rng.integers(4, 6) if movie_genre[m] == taste[u] else rng.integers(1, 3)
            # Times interleave users, so the time split leaves every user in train.
            lines.append(f"{u + 1}::{m + 1}::{rating}::{978300000 + rng.integers(0, 10**6)}\n")
    (directory / "ratings.dat").write_text("".join(lines))
    return directory
