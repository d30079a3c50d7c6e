/* A policy evaluation in one call, on a CPU: what auditor/policy/_host.py's NumPy program
 * computes (scope masks, leaf values, probes, leaf decisions, the node program, rule scores with
 * for_tokens runs, each exception's node score), row by row; the rows of a large batch are split
 * over OpenMP threads.
 *
 * Built into the same library as auditor/models/skinny.c and loaded by auditor/models/skinny.py;
 * auditor/policy/_host.py fills the program (auditor_policy below, its ctypes twin there) once
 * per engine and calls auditor_policy_eval per batch.
 *
 * Right after a forward has swept the caches, each of the NumPy program's ~25 calls cost 10-30 us
 * whatever its size; this loop over a few thousand numbers touches only them. NaN spreads through
 * maxima and minima as in NumPy (np.maximum / np.minimum); sums may add in another order.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { OP_ALL = 0, OP_ANY = 1, OP_NOT = 2 };
enum { TL_MEAN = 0, TL_COUNT = 1, TL_FRACTION = 2 };

typedef struct {
    int64_t n_feat, recon, n_scopes;
    const int64_t *scopes;         /* [S] 0 any, 1 prompt, 2 completion */
    int64_t n_leaves, width;
    const int64_t *max_index;      /* [W * L] group-major, into the column maxima [S * C0] */
    const int64_t *leaf_scope;     /* [L] 0..S-1 */
    const float *threshold, *divisor;  /* [L] */
    const uint8_t *positive;       /* [L] threshold > 0 */
    int64_t all_positive;
    int64_t n_tl;                  /* leaves aggregated over tokens: mean, count_above, fraction_above */
    const int64_t *tl, *tl_columns, *tl_scope, *tl_kind;  /* [Lt], [W * Lt] group-major, [Lt], [Lt] */
    const float *tl_above;         /* [Lt] */
    int64_t n_probe, n_units, n_pools;
    const int64_t *probe_leaves, *pooled_index;  /* [P], [P] into the logits [pools * S * U] */
    const float *neg_weight, *neg_bias;          /* [F * U], [U]: negated */
    float bound, not_cap, one_minus;
    int64_t n_nodes;
    const float *node_tail;        /* [N - L] */
    int64_t n_groups;
    const int64_t *group_op, *group_outs, *group_children;  /* [G] each */
    const int64_t *outs, *children;  /* concatenated: a group's outputs, its children child-major */
    int64_t n_rules;
    const int64_t *rule_node, *rule_scope;  /* [R] */
    int64_t scope_guard;
    int64_t n_exc;
    const int64_t *exc_node;       /* [E] */
    /* for_tokens rules: each leaf's per-token hold, the node program over them, the longest run
     * of tokens where the rule's node held. */
    int64_t n_ft, const_true;
    const int64_t *ft_rules, *ft_node, *ft_scope, *ft_need;  /* [Rf] each */
    const int64_t *token_columns;  /* [W * L] group-major, into V = [X | probe probabilities] */
    const uint8_t *counting;       /* [L] count_above / fraction_above: holds where v > above */
    const float *leaf_above;       /* [L] */
} auditor_policy;

/* np.maximum / np.minimum: NaN when either is NaN. */
static inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
static inline float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }

/* What the feature probes read: NaN as 0, beyond +-bound (infinities included) as +-bound. */
static inline float probe_in(float v, float bound) {
    if (v != v) return 0.0f;
    return v > bound ? bound : (v < -bound ? -bound : v);
}

/* Row b of out (R + E + N + 2 L floats from out + b * that) holds, in order: the rule scores
 * [R] then each exception's node score [E], every node's score [N], the leaves' values [L], and
 * whether each leaf fired [L] (1 or 0). After the B rows, what explanations read later: with
 * for_tokens rules, where each leaf held per token [B, T, L] (bytes); without, copies of the
 * inputs given, to compute those holds from: feats [B, T, F], recon [B, T], then the bytes of
 * mask, comp and prompt [B, T] each. Returns 0, or -1 when scratch memory cannot be had
 * (nothing written then). */
/* Rows first, first + step, ... of auditor_policy_eval's work, with scratch of their own. */
static int eval_rows(const auditor_policy *p, const float *feats, const uint8_t *mask, const uint8_t *comp,
                     const uint8_t *prompt, const float *recon, int64_t B, int64_t T, float *out, int64_t first,
                     int64_t step) {
    const int64_t S = p->n_scopes, F = p->n_feat, C0 = F + p->recon, L = p->n_leaves, W = p->width;
    const int64_t N = p->n_nodes, R = p->n_rules, E = p->n_exc, U = p->n_units, LT = p->n_tl;
    const int64_t stride = R + E + N + 2 * L;
    const int64_t pool_size = p->n_pools * S * F, logit_size = p->n_pools * S * U;
    int64_t floats = S * C0 + pool_size + logit_size;
    floats += floats & 1;  /* the counts after them 8-byte aligned */
    float *scratch = malloc((size_t)floats * sizeof(float) + (size_t)S * sizeof(int64_t) + (size_t)(S * T) + 1);
    if (!scratch) return -1;
    float *colmax = scratch, *pool_in = colmax + S * C0, *logits = pool_in + pool_size;
    int64_t *n_scope = (int64_t *)(scratch + floats);
    uint8_t *sm = (uint8_t *)(n_scope + S);
    uint8_t *held_all = (uint8_t *)(out + B * stride);  /* [B, T, L], with for_tokens rules */
    uint8_t *tok = NULL;  /* [T, N] every node's hold per token */
    float *v_tok = NULL;  /* [C0 + U] one token's V */
    if (p->n_ft) {
        tok = malloc((size_t)(T * N) + 1);
        v_tok = malloc((size_t)(C0 + U + 1) * sizeof(float));
        if (!tok || !v_tok) {
            free(scratch);
            free(tok);
            free(v_tok);
            return -1;
        }
    }

    for (int64_t b = first; b < B; b += step) {
        const float *x = feats + b * T * F, *rc = recon ? recon + b * T : NULL;
        const uint8_t *m = mask + b * T;
        float *rows = out + b * stride, *scores = rows + R + E, *value = scores + N, *fired = value + L;

        /* The tokens each scope sees, and how many. */
        for (int64_t s = 0; s < S; s++) {
            const int64_t scope = p->scopes[s];
            const uint8_t *role = scope == 1 ? prompt + b * T : scope == 2 ? comp + b * T : NULL;
            uint8_t *sms = sm + s * T;
            int64_t count = 0;
            for (int64_t t = 0; t < T; t++) {
                sms[t] = m[t] && (role == NULL || role[t]);
                count += sms[t];
            }
            n_scope[s] = count;
        }

        /* Each scope's column maxima over X = [latents | reconstruction error]. */
        for (int64_t s = 0; s < S; s++) {
            float *cm = colmax + s * C0;
            for (int64_t c = 0; c < C0; c++) cm[c] = -INFINITY;
            const uint8_t *sms = sm + s * T;
            for (int64_t t = 0; t < T; t++) {
                if (!sms[t]) continue;
                const float *xt = x + t * F;
                for (int64_t c = 0; c < F; c++) cm[c] = nan_max(cm[c], xt[c]);
                if (p->recon) cm[F] = nan_max(cm[F], rc[t]);
            }
        }
        /* Every leaf's max over its group's columns (probe leaves are overwritten below). */
        for (int64_t l = 0; l < L; l++) {
            float v = colmax[p->max_index[l]];
            for (int64_t g = 1; g < W; g++) v = nan_max(v, colmax[p->max_index[g * L + l]]);
            value[l] = v;
        }
        /* mean, count_above and fraction_above leaves: over each token's group max. */
        for (int64_t j = 0; j < LT; j++) {
            const int64_t sc = p->tl_scope[j], kind = p->tl_kind[j];
            const uint8_t *sms = sm + sc * T;
            const float above = p->tl_above[j];
            float acc = 0.0f;
            for (int64_t t = 0; t < T; t++) {
                if (!sms[t]) continue;
                float v = -INFINITY;
                for (int64_t g = 0; g < W; g++) {
                    const int64_t c = p->tl_columns[g * LT + j];
                    v = nan_max(v, c < F ? x[t * F + c] : rc[t]);
                }
                acc += kind == TL_MEAN ? v : (float)(v > above);
            }
            const float nf = (float)(n_scope[sc] > 1 ? n_scope[sc] : 1);
            value[p->tl[j]] = kind == TL_COUNT ? acc : acc / nf;
        }
        /* Feature probes: each scope's mean (and max) of what they read, every unit's negated
         * logit over it, a leaf's probability 1 / (1 + exp(negated logit)). */
        if (p->n_probe) {
            const float bound = p->bound;
            for (int64_t s = 0; s < S; s++) {
                float *mean = pool_in + s * F, *mx = p->n_pools > 1 ? pool_in + (S + s) * F : NULL;
                for (int64_t f = 0; f < F; f++) {
                    mean[f] = 0.0f;
                    if (mx) mx[f] = -INFINITY;
                }
                const uint8_t *sms = sm + s * T;
                for (int64_t t = 0; t < T; t++) {
                    if (!sms[t]) continue;
                    const float *xt = x + t * F;
                    for (int64_t f = 0; f < F; f++) {
                        const float v = probe_in(xt[f], bound);
                        mean[f] += v;
                        if (mx && v > mx[f]) mx[f] = v;
                    }
                }
                /* A scope of no token: 0 / 0, NaN, as in NumPy (its leaves are zeroed below). */
                for (int64_t f = 0; f < F; f++) mean[f] = (float)((double)mean[f] / (double)n_scope[s]);
            }
            for (int64_t ps = 0; ps < p->n_pools * S; ps++) {
                const float *in = pool_in + ps * F;
                float *lg = logits + ps * U;
                for (int64_t u = 0; u < U; u++) lg[u] = 0.0f;
                for (int64_t f = 0; f < F; f++) {
                    const float v = in[f];
                    const float *w = p->neg_weight + f * U;
                    for (int64_t u = 0; u < U; u++) lg[u] += v * w[u];
                }
                for (int64_t u = 0; u < U; u++) lg[u] += p->neg_bias[u];
            }
            for (int64_t i = 0; i < p->n_probe; i++)
                value[p->probe_leaves[i]] = 1.0f / (1.0f + expf(logits[p->pooled_index[i]]));
        }

        /* Leaf decisions: a NaN value, or a leaf whose scope saw no token, counts as 0. */
        for (int64_t l = 0; l < L; l++) {
            const int64_t n = n_scope[p->leaf_scope[l]];
            float v = value[l];
            if (n == 0 || v != v) v = 0.0f;
            value[l] = v;
            const float thr = p->threshold[l];
            float score;
            uint8_t f;
            if (p->all_positive) {
                f = v >= thr;
                score = v / thr;  /* >= 1 wherever fired; 1 may also round up from below */
                if (!f) score = nan_min(score, p->one_minus);
            } else {
                f = v >= thr && n > 0;
                score = p->positive[l] ? v / p->divisor[l] : (f ? p->not_cap : 0.0f);
                score = f ? nan_max(score, 1.0f) : nan_min(score, p->one_minus);
            }
            fired[l] = f ? 1.0f : 0.0f;
            scores[l] = score;
        }

        /* The node program, one group (a depth and an operation) after the other. */
        memcpy(scores + L, p->node_tail, (size_t)(N - L) * sizeof(float));
        const int64_t *outs = p->outs, *children = p->children;
        for (int64_t gi = 0; gi < p->n_groups; gi++) {
            const int64_t op = p->group_op[gi], n_out = p->group_outs[gi], n_child = p->group_children[gi];
            for (int64_t o = 0; o < n_out; o++) {
                float r = scores[children[o]];
                if (op == OP_NOT) {
                    const float inv = nan_min(r > 0.0f ? 1.0f / r : p->not_cap, p->not_cap);
                    r = r < 1.0f ? nan_max(inv, 1.0f) : nan_min(inv, p->one_minus);
                } else {
                    for (int64_t c = 1; c < n_child; c++) {
                        const float v = scores[children[c * n_out + o]];
                        r = op == OP_ALL ? nan_min(r, v) : nan_max(r, v);
                    }
                }
                scores[outs[o]] = r;
            }
            outs += n_out;
            children += n_out * n_child;
        }

        for (int64_t r = 0; r < R; r++) rows[r] = scores[p->rule_node[r]];

        if (p->n_ft) {
            /* Where each leaf held, per token: over V = [X | each probe's probability there]. */
            uint8_t *held = held_all + b * T * L;
            for (int64_t t = 0; t < T; t++) {
                const float *xt = x + t * F;
                memcpy(v_tok, xt, (size_t)F * sizeof(float));
                if (p->recon) v_tok[F] = rc[t];
                for (int64_t u = 0; u < U; u++) {
                    float lg = 0.0f;
                    for (int64_t f = 0; f < F; f++) lg += probe_in(xt[f], p->bound) * p->neg_weight[f * U + u];
                    v_tok[C0 + u] = 1.0f / (1.0f + expf(lg + p->neg_bias[u]));
                }
                uint8_t *h = held + t * L, *tn = tok + t * N;
                for (int64_t l = 0; l < L; l++) {
                    float v = v_tok[p->token_columns[l]];
                    for (int64_t g = 1; g < W; g++) v = nan_max(v, v_tok[p->token_columns[g * L + l]]);
                    const uint8_t in_scope = sm[p->leaf_scope[l] * T + t];
                    h[l] = in_scope && (p->counting[l] ? v > p->leaf_above[l] : v >= p->threshold[l]);
                    tn[l] = h[l];
                }
                memset(tn + L, 0, (size_t)(N - L));
                tn[p->const_true] = 1;
                const int64_t *go = p->outs, *gc = p->children;
                for (int64_t gi = 0; gi < p->n_groups; gi++) {
                    const int64_t op = p->group_op[gi], n_out = p->group_outs[gi], n_child = p->group_children[gi];
                    for (int64_t o = 0; o < n_out; o++) {
                        uint8_t r = tn[gc[o]];
                        if (op == OP_NOT) {
                            r = !r;
                        } else {
                            for (int64_t c = 1; c < n_child; c++) {
                                const uint8_t v = tn[gc[c * n_out + o]];
                                r = op == OP_ALL ? (r && v) : (r || v);
                            }
                        }
                        tn[go[o]] = r;
                    }
                    go += n_out;
                    gc += n_out * n_child;
                }
            }
            /* A for_tokens rule's score is at most its longest run over the tokens it needs. */
            for (int64_t j = 0; j < p->n_ft; j++) {
                const int64_t node = p->ft_node[j], need = p->ft_need[j];
                const uint8_t *sms = sm + p->ft_scope[j] * T;
                int64_t run = 0, longest = 0;
                for (int64_t t = 0; t < T; t++) {
                    run = tok[t * N + node] && sms[t] ? run + 1 : 0;
                    if (run > longest) longest = run;
                }
                float rs = (float)longest / (float)need;
                rs = longest >= need ? nan_max(rs, 1.0f) : nan_min(rs, p->one_minus);
                float *rule = rows + p->ft_rules[j];
                *rule = nan_min(*rule, rs);
            }
        }
        /* Rule scores: 0 where the rule's scope saw no token, with a `not` in the policy; then
         * each exception's node score. */
        if (p->scope_guard)
            for (int64_t r = 0; r < R; r++)
                if (n_scope[p->rule_scope[r]] == 0) rows[r] = 0.0f;
        for (int64_t e = 0; e < E; e++) rows[R + e] = scores[p->exc_node[e]];
    }
    free(scratch);
    free(tok);
    free(v_tok);
    return 0;
}

/* Evaluations of fewer feature values run on the calling thread: an OpenMP team's start would
 * cost more than it saves. Larger ones split their rows over `threads` (torch's thread count). */
#define PARALLEL_WORK (1 << 16)

int auditor_policy_eval(const auditor_policy *p, const float *feats, const uint8_t *mask, const uint8_t *comp,
                        const uint8_t *prompt, const float *recon, int64_t B, int64_t T, float *out, int threads) {
    int failed = 0;
    if (threads > B) threads = (int)B;
    if (threads < 2 || B * T * (p->n_feat + 1) < PARALLEL_WORK) {
        failed = eval_rows(p, feats, mask, comp, prompt, recon, B, T, out, 0, 1);
    } else {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        failed = eval_rows(p, feats, mask, comp, prompt, recon, B, T, out, omp_get_thread_num(), omp_get_num_threads());
    }
    if (failed) return -1;
    if (p->n_ft) return 0;  /* the holds are written */

    const int64_t F = p->n_feat, stride = p->n_rules + p->n_exc + p->n_nodes + 2 * p->n_leaves;
    float *copy = out + B * stride;
    memcpy(copy, feats, (size_t)(B * T * F) * sizeof(float));
    copy += B * T * F;
    if (recon) {
        memcpy(copy, recon, (size_t)(B * T) * sizeof(float));
        copy += B * T;
    }
    uint8_t *bytes = (uint8_t *)copy;
    const uint8_t *masks[3] = {mask, comp, prompt};
    for (int i = 0; i < 3; i++) {
        if (!masks[i]) continue;
        memcpy(bytes, masks[i], (size_t)(B * T));
        bytes += B * T;
    }
    return 0;
}
