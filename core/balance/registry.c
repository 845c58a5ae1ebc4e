/* registry.c: every balancing policy moelab knows. A new policy is one file in core/balance/ and one line
 * here. */
#include "policy.h"

extern const ml_policy policy_none, policy_aux_loss, policy_seq_aux_loss, policy_global_aux_loss,
    policy_top1_loss, policy_z_loss, policy_loss_free, policy_topk_schedule, policy_capacity,
    policy_forced_balance;

const ml_policy *const ml_policies[] = {
    &policy_none,
    &policy_aux_loss,
    &policy_seq_aux_loss,
    &policy_global_aux_loss,
    &policy_top1_loss,
    &policy_z_loss,
    &policy_loss_free,
    &policy_topk_schedule,
    &policy_capacity,
    &policy_forced_balance,
    NULL,
};
