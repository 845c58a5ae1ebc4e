/* rng.h: xoshiro256** (Blackman & Vigna), seeded by splitmix64. Its whole state is four words, saved in
 * checkpoints so a resumed run draws the same numbers. */
#ifndef MOELAB_RNG_H
#define MOELAB_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t s[4];
} ml_rng;

void rng_seed(ml_rng *r, uint64_t seed);
uint64_t rng_next(ml_rng *r);
/* uniform in [0, 1) with 53 bits */
double rng_uniform(ml_rng *r);
/* standard normal (Box-Muller) */
double rng_normal(ml_rng *r);

#endif
