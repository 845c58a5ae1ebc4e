/* none.c: no balancing: plain top-k routing, the baseline that shows what routing does on its own. */
#include "policy.h"

const ml_policy policy_none = {
    .name = "none",
    .summary = "no balancing term: plain top-k routing",
};
