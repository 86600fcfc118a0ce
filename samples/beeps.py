"""Short sounds for the bundled model's audio questions: 1-3 beeps at a low, middle or high pitch, with noise.

    "How many beeps are there?"          one | two | three
    "Is the tone low, middle or high?"   low | middle | high

A clip is 0.3-3 s of mono float32 at 16 kHz. Its beeps share one pitch class: low 180-360 Hz, middle
480-900 Hz, high 1300-2600 Hz (a tone drawn from the class, a few percent of vibrato or a second harmonic
sometimes added); each beep lasts 70-400 ms with 5-30 ms ramps, apart by at least 90 ms of quiet (two of the
model's 40-ms audio tokens), at a level from -26 to -6 dBFS over white or pink noise 12-35 dB below it, and
a slow hum sometimes. A curriculum: ``hard`` is the chance that a sound gets that noise; otherwise its noise
is 30-40 dB down with no hum (training raises ``hard`` from a quarter to one). ``BeepMaker`` is the training
generator; the held-out evaluation uses its own sounds
(``samples.scenes_heldout``).
"""
from __future__ import annotations

import random

import numpy as np

from samples.scenes import Medium
from samples.shapes import COUNT_WORDS

SAMPLING_RATE = 16_000
PITCHES = {"low": (180.0, 360.0), "middle": (480.0, 900.0), "high": (1300.0, 2600.0)}  # Hz
BEEP_PROMPTS = {"beeps": "How many beeps are there?", "pitch": "Is the tone low, middle or high?"}
MIN_GAP_S = 0.09


def tone(freq: float, num_samples: int, ramp: int, rng: random.Random, phase: float = 0.0) -> np.ndarray:
    """A sine at ``freq`` with linear ramps of ``ramp`` samples, sometimes with vibrato or a second harmonic."""
    t = np.arange(num_samples) / SAMPLING_RATE
    if rng.random() < 0.3:  # vibrato: a few percent at 4-8 Hz
        depth, rate = rng.uniform(0.005, 0.03), rng.uniform(4, 8)
        angle = 2 * np.pi * freq * (t + depth / (2 * np.pi * rate) * np.sin(2 * np.pi * rate * t)) + phase
    else:
        angle = 2 * np.pi * freq * t + phase
    wave = np.sin(angle)
    if rng.random() < 0.3:
        wave += rng.uniform(0.1, 0.4) * np.sin(2 * angle)
    envelope = np.ones(num_samples)
    ramp = min(ramp, num_samples // 2)
    if ramp:
        envelope[:ramp] = np.linspace(0, 1, ramp)
        envelope[-ramp:] = np.linspace(1, 0, ramp)
    return wave * envelope / np.abs(wave).max()


def pink_noise(num_samples: int, np_rng: np.random.Generator) -> np.ndarray:
    """1/f noise by shaping white noise's spectrum; unit RMS."""
    spectrum = np.fft.rfft(np_rng.standard_normal(num_samples))
    spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1))
    noise = np.fft.irfft(spectrum, num_samples)
    return noise / (noise.std() + 1e-9)


class BeepMaker:
    """Training sounds; the same seed gives the same stream."""

    def __init__(self, seed: int, hard: float = 1.0):
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(self.rng.getrandbits(32))
        self.hard = hard  # the chance a sound gets the whole range of noise (else a quiet background)

    def layout(self, num_beeps: int) -> tuple[int, list[tuple[int, int]]]:
        """(total samples, [(start, length)] per beep): 0.3-3 s, beeps 70-400 ms, gaps >= MIN_GAP_S."""
        rng = self.rng
        while True:
            total_s = rng.uniform(0.3, 3.0)
            lengths = [rng.uniform(0.07, 0.4) for _ in range(num_beeps)]
            free = total_s - sum(lengths) - MIN_GAP_S * (num_beeps - 1)
            if free >= 0.0:
                break
        cuts = sorted(rng.uniform(0, free) for _ in range(num_beeps))
        parts = [b - a for a, b in zip([0.0] + cuts, cuts)]  # the free time before each beep (the rest: after)
        beeps, t = [], 0.0
        for length, part in zip(lengths, parts):
            t += part + (MIN_GAP_S if beeps else 0.0)
            beeps.append((round(t * SAMPLING_RATE), round(length * SAMPLING_RATE)))
            t += length
        return round(total_s * SAMPLING_RATE), beeps

    def sound(self, num_beeps: int, pitch: str) -> np.ndarray:
        rng = self.rng
        total, beeps = self.layout(num_beeps)
        lo, hi = PITCHES[pitch]
        freq = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        wave = np.zeros(total)
        for start, length in beeps:
            wave[start:start + length] += tone(freq * rng.uniform(0.98, 1.02), length,
                                               round(rng.uniform(0.005, 0.03) * SAMPLING_RATE), rng,
                                               rng.uniform(0, 2 * np.pi))[: total - start]
        level = 10 ** (rng.uniform(-26, -6) / 20)
        quiet = rng.random() >= self.hard
        noise = self.np_rng.standard_normal(total) if rng.random() < 0.5 else pink_noise(total, self.np_rng)
        noise *= level / np.sqrt(2) * 10 ** (-(rng.uniform(30, 40) if quiet else rng.uniform(12, 35)) / 20)
        if rng.random() < 0.2 and not quiet:  # mains hum
            noise += level * 0.05 * np.sin(2 * np.pi * rng.choice((50.0, 60.0)) * np.arange(total) / SAMPLING_RATE)
        return (wave * level + noise).astype(np.float32)

    def annotated(self) -> Medium:
        num_beeps, pitch = self.rng.randint(1, 3), self.rng.choice(list(PITCHES))
        return Medium({"beeps": COUNT_WORDS[num_beeps - 1], "pitch": pitch}, audio=self.sound(num_beeps, pitch))
