/* experiment.c: experiment files (see experiment.h). libyaml loads the document (with line marks on every
 * node); this file checks it against the config key table and expands it into fully resolved runs. It must
 * survive any input (it runs under a fuzzer): every walk is bounded in depth, nodes visited and text size. */
#include "experiment.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "rundb.h"

#define MAX_DEPTH 16          /* nested mappings / lists */
#define MAX_VISITS 200000     /* nodes visited in all (aliases can make a small file a huge tree) */
#define MAX_PAIRS 1000        /* keys in one mapping, values in one axis */
#define MAX_VALUE 4096        /* bytes of one value */
#define MAX_FILE (16 << 20)

typedef struct {
    const char *path;
    yaml_document_t *doc;
    ml_err *err;
    long visits;
} walk;

static int fail(walk *w, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(walk *w, int line, const char *fmt, ...) {
    char msg[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (line > 0) return ml_errf(w->err, ML_EINPUT, "%.300s:%d: %.700s", w->path, line, msg);
    return ml_errf(w->err, ML_EINPUT, "command line: %s", msg);
}

static int line_of(const yaml_node_t *n) { return (int)n->start_mark.line + 1; }

static yaml_node_t *node(walk *w, int index) { return yaml_document_get_node(w->doc, index); }

/* Counts a visited node; fails once the document has expanded past MAX_VISITS. */
static int visit(walk *w, const yaml_node_t *n, int depth) {
    if (++w->visits > MAX_VISITS) return fail(w, line_of(n), "the document is too large (aliases expand too far)");
    if (depth > MAX_DEPTH) return fail(w, line_of(n), "nested more than %d levels deep", MAX_DEPTH);
    return ML_OK;
}

static int is_null(const yaml_node_t *n) {
    if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return 0;
    const char *v = (const char *)n->data.scalar.value;
    return !strcmp(v, "") || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") || !strcmp(v, "NULL");
}

static const char *type_name(const yaml_node_t *n) {
    return n->type == YAML_MAPPING_NODE ? "a mapping" : n->type == YAML_SEQUENCE_NODE ? "a list" : "a value";
}

/* A scalar's text into buf (no NUL bytes inside, shorter than cap). what names it in messages. */
static int scalar(walk *w, const yaml_node_t *n, const char *what, char *buf, size_t cap) {
    if (n->type != YAML_SCALAR_NODE) return fail(w, line_of(n), "%s: expected a single value, not %s", what, type_name(n));
    size_t len = n->data.scalar.length;
    if (strlen((const char *)n->data.scalar.value) != len) return fail(w, line_of(n), "%s: contains a NUL byte", what);
    if (len >= cap) return fail(w, line_of(n), "%s: longer than %zu bytes", what, cap - 1);
    memcpy(buf, n->data.scalar.value, len + 1);
    return ML_OK;
}

/* ---- flow text: a list or mapping given to a text key becomes "[a, b]" / "{k: v}" ---- */

typedef struct {
    char buf[MAX_VALUE];
    size_t len;
    int overflow;
} text_buf;

static void put(text_buf *t, const char *s, size_t n) {
    if (t->len + n >= sizeof t->buf) {
        t->overflow = 1;
        return;
    }
    memcpy(t->buf + t->len, s, n);
    t->len += n;
    t->buf[t->len] = 0;
}

static int flow(walk *w, const yaml_node_t *n, text_buf *t, int depth) {
    int rc = visit(w, n, depth);
    if (rc) return rc;
    if (t->overflow) return fail(w, line_of(n), "value longer than %d bytes", MAX_VALUE - 1);
    if (n->type == YAML_SCALAR_NODE) {
        const char *v = (const char *)n->data.scalar.value;
        if (strlen(v) != n->data.scalar.length) return fail(w, line_of(n), "value contains a NUL byte");
        if (n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE) {
            put(t, v, strlen(v));
        } else {
            put(t, "\"", 1);
            for (const char *p = v; *p; p++) {
                if (*p == '"' || *p == '\\') put(t, "\\", 1);
                put(t, p, 1);
            }
            put(t, "\"", 1);
        }
    } else if (n->type == YAML_SEQUENCE_NODE) {
        put(t, "[", 1);
        for (yaml_node_item_t *i = n->data.sequence.items.start; i < n->data.sequence.items.top && !rc; i++) {
            if (i > n->data.sequence.items.start) put(t, ", ", 2);
            yaml_node_t *item = node(w, *i);
            rc = item ? flow(w, item, t, depth + 1) : fail(w, line_of(n), "broken list");
        }
        put(t, "]", 1);
    } else if (n->type == YAML_MAPPING_NODE) {
        put(t, "{", 1);
        for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top && !rc; p++) {
            if (p > n->data.mapping.pairs.start) put(t, ", ", 2);
            yaml_node_t *k = node(w, p->key), *v = node(w, p->value);
            if (!k || !v) return fail(w, line_of(n), "broken mapping");
            rc = flow(w, k, t, depth + 1);
            put(t, ": ", 2);
            if (!rc) rc = flow(w, v, t, depth + 1);
        }
        put(t, "}", 1);
    }
    if (!rc && t->overflow) rc = fail(w, line_of(n), "value longer than %d bytes", MAX_VALUE - 1);
    return rc;
}

/* ---- override lists ---- */

static int ov_find(const ml_overrides *o, const char *key) {
    for (int i = 0; i < o->n; i++)
        if (!strcmp(o->items[i].key, key)) return i;
    return -1;
}

static void ov_free(ml_overrides *o) {
    for (int i = 0; i < o->n; i++) free(o->items[i].value);
    free(o->items);
    memset(o, 0, sizeof *o);
}

/* Checks that key = value parses (on a scratch config) and appends it. unique: a key may appear once. */
static int ov_add(walk *w, ml_overrides *o, const char *key, const char *value, int line, int unique) {
    if (strlen(key) >= sizeof o->items[0].key) return fail(w, line, "%.60s...: key too long", key);
    if (unique) {
        int i = ov_find(o, key);
        if (i >= 0) return fail(w, line, "%s: given twice (first on line %d)", key, o->items[i].line);
    }
    if (!strncmp(key, "run.", 4) && strcmp(key, "run.db"))
        return fail(w, line, "%s: set by moelab for each run (choose the folder with --runs-dir)", key);
    ml_config scratch;
    config_preset(&scratch, "tiny", NULL);
    ml_err e = {0};
    char *assignment = malloc(strlen(key) + strlen(value) + 2);
    if (!assignment) return fail(w, line, "out of memory");
    sprintf(assignment, "%s=%s", key, value);
    int rc = config_set(&scratch, assignment, &e);
    free(assignment);
    if (rc) return fail(w, line, "%s", e.msg);
    if (o->n == o->cap) {
        int cap = o->cap ? 2 * o->cap : 16;
        ml_override *grown = realloc(o->items, (size_t)cap * sizeof *grown);
        if (!grown) return fail(w, line, "out of memory");
        o->items = grown, o->cap = cap;
    }
    ml_override *it = &o->items[o->n];
    snprintf(it->key, sizeof it->key, "%s", key);
    if (!(it->value = strdup(value))) return fail(w, line, "out of memory");
    it->line = line;
    o->n++;
    return ML_OK;
}

/* The value of a config key's node: a scalar's text, or the flow text of a list or mapping for text keys. */
static int value_text(walk *w, const char *key, const yaml_node_t *v, text_buf *t, int depth) {
    t->len = 0, t->overflow = 0, t->buf[0] = 0;
    if (v->type == YAML_SCALAR_NODE) {
        if (is_null(v)) return fail(w, line_of(v), "%s: no value given", key);
        return scalar(w, v, key, t->buf, sizeof t->buf);
    }
    if (config_key_type(key) != ML_KEY_TEXT)
        return fail(w, line_of(v), "%s: expected a single value, not %s", key, type_name(v));
    return flow(w, v, t, depth);
}

static int join_key(walk *w, const yaml_node_t *k, const char *prefix, char *out, size_t cap) {
    char name[128];
    int rc = scalar(w, k, "key", name, sizeof name);
    if (rc) return rc;
    if (!name[0]) return fail(w, line_of(k), "empty key");
    if ((size_t)snprintf(out, cap, "%s%s%s", prefix, prefix[0] ? "." : "", name) >= cap)
        return fail(w, line_of(k), "%s.%s: key too long", prefix, name);
    return ML_OK;
}

static int check_mapping(walk *w, const yaml_node_t *n, const char *what) {
    if (n->type != YAML_MAPPING_NODE) return fail(w, line_of(n), "%s: expected a mapping of keys, not %s", what, type_name(n));
    if (n->data.mapping.pairs.top - n->data.mapping.pairs.start > MAX_PAIRS)
        return fail(w, line_of(n), "%s: more than %d keys", what, MAX_PAIRS);
    return ML_OK;
}

/* Config keys of a mapping (base, a variant), nested mappings joined with '.'. skip: a key handled by the
 * caller at the top (a variant's "cross"). */
static int flatten(walk *w, const yaml_node_t *n, const char *prefix, ml_overrides *out, const char *skip,
                   int depth) {
    int rc = visit(w, n, depth);
    if (!rc) rc = check_mapping(w, n, prefix[0] ? prefix : "base");
    for (yaml_node_pair_t *p = n->data.mapping.pairs.start; !rc && p < n->data.mapping.pairs.top; p++) {
        yaml_node_t *k = node(w, p->key), *v = node(w, p->value);
        if (!k || !v) return fail(w, line_of(n), "broken mapping");
        char key[128];
        if ((rc = join_key(w, k, prefix, key, sizeof key))) break;
        if (skip && !strcmp(key, skip)) continue;
        if (config_key_type(key) == ML_KEY_UNKNOWN) {
            if (v->type == YAML_MAPPING_NODE) rc = flatten(w, v, key, out, NULL, depth + 1);
            else rc = fail(w, line_of(k), "%s: unknown key (see moelab train --help-config)", key);
            continue;
        }
        text_buf *t = malloc(sizeof *t);
        if (!t) return fail(w, line_of(k), "out of memory");
        rc = value_text(w, key, v, t, depth + 1);
        if (!rc) rc = ov_add(w, out, key, t->buf, line_of(k), 1);
        free(t);
    }
    return rc;
}

/* ---- sections ---- */

static int parse_sweep(walk *w, ml_experiment *x, const yaml_node_t *n, const char *prefix, int depth) {
    int rc = visit(w, n, depth);
    if (!rc) rc = check_mapping(w, n, prefix[0] ? prefix : "sweep");
    for (yaml_node_pair_t *p = n->data.mapping.pairs.start; !rc && p < n->data.mapping.pairs.top; p++) {
        yaml_node_t *k = node(w, p->key), *v = node(w, p->value);
        if (!k || !v) return fail(w, line_of(n), "broken mapping");
        char key[128];
        if ((rc = join_key(w, k, prefix, key, sizeof key))) break;
        if (config_key_type(key) == ML_KEY_UNKNOWN) {
            if (v->type == YAML_MAPPING_NODE) rc = parse_sweep(w, x, v, key, depth + 1);
            else rc = fail(w, line_of(k), "%s: unknown key (see moelab train --help-config)", key);
            continue;
        }
        if (v->type != YAML_SEQUENCE_NODE)
            return fail(w, line_of(k), "%s: a sweep axis needs a list of values, e.g. %s: [a, b]", key, key);
        const long nv = v->data.sequence.items.top - v->data.sequence.items.start;
        if (nv == 0) return fail(w, line_of(k), "%s: empty sweep axis (give at least one value)", key);
        if (nv > MAX_PAIRS) return fail(w, line_of(k), "%s: more than %d values", key, MAX_PAIRS);
        for (int a = 0; a < x->naxes; a++)
            if (!strcmp(x->axes[a].key, key))
                return fail(w, line_of(k), "%s: swept twice (first on line %d)", key, x->axes[a].line);
        ml_axis *grown = realloc(x->axes, (size_t)(x->naxes + 1) * sizeof *grown);
        if (!grown) return fail(w, line_of(k), "out of memory");
        x->axes = grown;
        ml_axis *ax = &x->axes[x->naxes++];
        memset(ax, 0, sizeof *ax);
        snprintf(ax->key, sizeof ax->key, "%s", key);
        ax->line = line_of(k);
        text_buf *t = malloc(sizeof *t);
        if (!t) return fail(w, line_of(k), "out of memory");
        for (yaml_node_item_t *i = v->data.sequence.items.start; !rc && i < v->data.sequence.items.top; i++) {
            yaml_node_t *item = node(w, *i);
            if (!item) {
                rc = fail(w, line_of(v), "broken list");
                break;
            }
            if (!(rc = visit(w, item, depth + 1))) rc = value_text(w, key, item, t, depth + 2);
            if (rc) break;
            for (int j = 0; j < ax->values.n && !rc; j++)
                if (!strcmp(ax->values.items[j].value, t->buf))
                    rc = fail(w, line_of(item), "%s: value '%s' appears twice in the sweep (first on line %d)", key,
                              t->buf, ax->values.items[j].line);
            if (!rc) rc = ov_add(w, &ax->values, key, t->buf, line_of(item), 0);
        }
        free(t);
    }
    return rc;
}

static int valid_name(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_' && *s != '-' && *s != '.') return 0;
    return 1;
}

static int parse_bool(const char *v, int *out) {
    if (!strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on")) return *out = 1, 1;
    if (!strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "off")) return *out = 0, 1;
    return 0;
}

static int parse_variants(walk *w, ml_experiment *x, const yaml_node_t *n) {
    int rc = visit(w, n, 1);
    if (!rc) rc = check_mapping(w, n, "variants");
    if (rc) return rc;
    const long nv = n->data.mapping.pairs.top - n->data.mapping.pairs.start;
    if (nv == 0) return fail(w, line_of(n), "variants: empty (remove it, or name at least one variant)");
    if (!(x->variants = calloc((size_t)nv, sizeof *x->variants))) return fail(w, line_of(n), "out of memory");
    for (yaml_node_pair_t *p = n->data.mapping.pairs.start; !rc && p < n->data.mapping.pairs.top; p++) {
        yaml_node_t *k = node(w, p->key), *v = node(w, p->value);
        if (!k || !v) return fail(w, line_of(n), "broken mapping");
        ml_variant *var = &x->variants[x->nvariants];
        if ((rc = scalar(w, k, "variant name", var->name, sizeof var->name))) break;
        if (!valid_name(var->name))
            return fail(w, line_of(k), "variants: '%s' is not a valid variant name (letters, digits, '_', '-', '.')",
                        var->name);
        for (int i = 0; i < x->nvariants; i++)
            if (!strcmp(x->variants[i].name, var->name))
                return fail(w, line_of(k), "variants: '%s' given twice (first on line %d)", var->name,
                            x->variants[i].line);
        var->line = line_of(k);
        var->cross = 1;
        x->nvariants++;
        if (is_null(v)) continue; /* a variant that changes nothing: the base config itself */
        if ((rc = check_mapping(w, v, var->name))) break;
        for (yaml_node_pair_t *q = v->data.mapping.pairs.start; q < v->data.mapping.pairs.top; q++) {
            yaml_node_t *qk = node(w, q->key), *qv = node(w, q->value);
            if (!qk || !qv || qk->type != YAML_SCALAR_NODE || strcmp((const char *)qk->data.scalar.value, "cross"))
                continue;
            char b[16];
            if (qv->type != YAML_SCALAR_NODE || qv->data.scalar.length >= sizeof b ||
                !parse_bool((const char *)qv->data.scalar.value, &var->cross))
                return fail(w, line_of(qk), "variants: %s: cross: expected true or false", var->name);
        }
        rc = flatten(w, v, "", &var->set, "cross", 2);
    }
    return rc;
}

static int parse_seeds(walk *w, ml_experiment *x, const yaml_node_t *n) {
    x->seeds_line = line_of(n);
    char buf[32], *end;
    if (n->type == YAML_SCALAR_NODE) {
        int rc = scalar(w, n, "seeds", buf, sizeof buf);
        if (rc) return rc;
        errno = 0;
        long count = strtol(buf, &end, 10);
        if (end == buf || *end || errno || count < 1 || count > ML_MAX_RUNS)
            return fail(w, line_of(n), "seeds: expected a list of seeds or a count in [1, %d], not '%s'", ML_MAX_RUNS, buf);
        if (!(x->seeds = calloc((size_t)count, sizeof *x->seeds))) return fail(w, line_of(n), "out of memory");
        for (long i = 0; i < count; i++) x->seeds[i] = (uint64_t)i + 1;
        x->nseeds = (int)count;
        return ML_OK;
    }
    if (n->type != YAML_SEQUENCE_NODE) return fail(w, line_of(n), "seeds: expected a list of seeds or a count");
    const long count = n->data.sequence.items.top - n->data.sequence.items.start;
    if (count == 0) return fail(w, line_of(n), "seeds: empty list");
    if (count > ML_MAX_RUNS) return fail(w, line_of(n), "seeds: more than %d", ML_MAX_RUNS);
    if (!(x->seeds = calloc((size_t)count, sizeof *x->seeds))) return fail(w, line_of(n), "out of memory");
    for (yaml_node_item_t *i = n->data.sequence.items.start; i < n->data.sequence.items.top; i++) {
        yaml_node_t *item = node(w, *i);
        if (!item) return fail(w, line_of(n), "broken list");
        int rc = scalar(w, item, "seeds", buf, sizeof buf);
        if (rc) return rc;
        errno = 0;
        unsigned long long s = strtoull(buf, &end, 10);
        if (end == buf || *end || errno || !isdigit((unsigned char)buf[0]))
            return fail(w, line_of(item), "seeds: '%s' is not a non-negative integer", buf);
        for (int j = 0; j < x->nseeds; j++)
            if (x->seeds[j] == s) return fail(w, line_of(item), "seeds: %llu appears twice", s);
        x->seeds[x->nseeds++] = s;
    }
    return ML_OK;
}

static const char *const sections[] = {"name", "description", "base", "sweep", "variants", "seeds", NULL};

static int parse_root(walk *w, ml_experiment *x, const yaml_node_t *root) {
    if (root->type != YAML_MAPPING_NODE)
        return fail(w, line_of(root), "expected a mapping with name:, description:, base:, sweep:, variants:, seeds:");
    if (root->data.mapping.pairs.top - root->data.mapping.pairs.start > MAX_PAIRS)
        return fail(w, line_of(root), "too many top-level keys");
    int seen[6] = {0}, rc = ML_OK;
    for (yaml_node_pair_t *p = root->data.mapping.pairs.start; !rc && p < root->data.mapping.pairs.top; p++) {
        yaml_node_t *k = node(w, p->key), *v = node(w, p->value);
        if (!k || !v) return fail(w, line_of(root), "broken mapping");
        char key[128];
        if ((rc = scalar(w, k, "key", key, sizeof key))) break;
        int s = 0;
        while (sections[s] && strcmp(sections[s], key)) s++;
        if (!sections[s]) {
            if (config_key_type(key) != ML_KEY_UNKNOWN || strchr(key, '.'))
                return fail(w, line_of(k), "%s: config keys go under base: (or sweep:, variants:)", key);
            return fail(w, line_of(k), "unknown top-level key '%s' (expected name, description, base, sweep, variants, "
                        "seeds)", key);
        }
        if (seen[s]) return fail(w, line_of(k), "%s: given twice (first on line %d)", key, seen[s]);
        seen[s] = line_of(k);
        if (is_null(v) && s >= 2) continue; /* an empty section */
        switch (s) {
        case 0:
            rc = scalar(w, v, "name", x->name, sizeof x->name);
            if (!rc && !valid_name(x->name))
                rc = fail(w, line_of(v), "name: '%s' may only hold letters, digits, '_', '-' and '.'", x->name);
            break;
        case 1: {
            char *d = malloc(MAX_VALUE);
            if (!d) return fail(w, line_of(v), "out of memory");
            rc = scalar(w, v, "description", d, MAX_VALUE);
            if (rc) free(d);
            else x->description = d;
            break;
        }
        case 2: rc = flatten(w, v, "", &x->base, NULL, 1); break;
        case 3: rc = parse_sweep(w, x, v, "", 1); break;
        case 4: rc = parse_variants(w, x, v); break;
        case 5: rc = parse_seeds(w, x, v); break;
        }
    }
    if (!rc && seen[3] && x->naxes == 0) rc = fail(w, seen[3], "sweep: empty (give at least one axis, or remove it)");
    return rc;
}

/* ---- cross checks and expansion ---- */

static const ml_override *axis_value(const ml_experiment *x, const ml_run_spec *r, int a) {
    return r->axis_index[a] < 0 ? NULL : &x->axes[a].values.items[r->axis_index[a]];
}

const char *experiment_axis_value(const ml_experiment *x, int run, int a) {
    const ml_override *o = axis_value(x, &x->runs[run], a);
    return o ? o->value : NULL;
}

static int is_swept(const ml_experiment *x, const char *key) {
    for (int a = 0; a < x->naxes; a++)
        if (!strcmp(x->axes[a].key, key)) return x->axes[a].line;
    return 0;
}

static int cross_checks(walk *w, ml_experiment *x) {
    for (int v = 0; v < x->nvariants; v++)
        for (int i = 0; i < x->variants[v].set.n; i++) {
            const ml_override *o = &x->variants[v].set.items[i];
            int line = is_swept(x, o->key);
            if (x->variants[v].cross && line)
                return fail(w, o->line, "%s: set by variant '%s' and swept on line %d (give the variant cross: false, "
                            "or drop one)", o->key, x->variants[v].name, line);
            if (x->nseeds && !strcmp(o->key, "seed"))
                return fail(w, o->line, "seed: set by variant '%s' and by seeds: on line %d", x->variants[v].name,
                            x->seeds_line);
        }
    for (int i = 0; i < x->base.n; i++) {
        if (x->nseeds && !strcmp(x->base.items[i].key, "seed"))
            return fail(w, x->base.items[i].line, "seed: give either base seed: or seeds: (line %d)", x->seeds_line);
    }
    if (x->nseeds && is_swept(x, "seed"))
        return fail(w, is_swept(x, "seed"), "seed: swept and given by seeds: on line %d", x->seeds_line);
    /* axis labels: the last component of the key unless two axes share it */
    for (int a = 0; a < x->naxes; a++) {
        const char *dot = strrchr(x->axes[a].key, '.');
        snprintf(x->axes[a].label, sizeof x->axes[a].label, "%s", dot ? dot + 1 : x->axes[a].key);
    }
    for (int a = 0; a < x->naxes; a++)
        for (int b = 0; b < x->naxes; b++)
            if (a != b && !strcmp(x->axes[a].label, x->axes[b].label) && strcmp(x->axes[a].label, x->axes[a].key)) {
                const char *dot = strrchr(x->axes[b].key, '.');
                if (dot && !strcmp(dot + 1, x->axes[a].label))
                    snprintf(x->axes[a].label, sizeof x->axes[a].label, "%s", x->axes[a].key);
            }
    return ML_OK;
}

static int apply(walk *w, ml_config *cfg, const ml_override *o) {
    if (!strcmp(o->key, "preset")) return ML_OK; /* applied first */
    char *assignment = malloc(strlen(o->key) + strlen(o->value) + 2);
    if (!assignment) return fail(w, o->line, "out of memory");
    sprintf(assignment, "%s=%s", o->key, o->value);
    ml_err e = {0};
    int rc = config_set(cfg, assignment, &e);
    free(assignment);
    return rc ? fail(w, o->line, "%s", e.msg) : ML_OK;
}

/* The override a run's value of key came from (the last to set it), or NULL. */
static const ml_override *source_of(const ml_experiment *x, const ml_run_spec *r, const char *key) {
    int i = ov_find(&x->cli, key);
    if (i >= 0) return &x->cli.items[i];
    for (int a = x->naxes - 1; a >= 0; a--) {
        const ml_override *o = axis_value(x, r, a);
        if (o && !strcmp(o->key, key)) return o;
    }
    if (r->variant >= 0 && (i = ov_find(&x->variants[r->variant].set, key)) >= 0)
        return &x->variants[r->variant].set.items[i];
    if ((i = ov_find(&x->base, key)) >= 0) return &x->base.items[i];
    return NULL;
}

/* Ids go into folder names, SQL literals and comma-separated lists (--runs A,B): the name's commas become
 * dots and anything outside [A-Za-z0-9._=+-] an underscore. */
static void sanitize(char *s) {
    for (; *s; s++)
        if (*s == ',') *s = '.';
        else if (!isalnum((unsigned char)*s) && !strchr("._=+-", *s)) *s = '_';
}

/* Resolves run r (variant, axis_index and seed set) into its config, name, hash and id. */
static int resolve(walk *w, ml_experiment *x, ml_run_spec *r, const char *runs_dir) {
    const ml_override *preset = source_of(x, r, "preset");
    ml_config *cfg = &r->cfg;
    int rc = config_preset(cfg, preset ? preset->value : "tiny", w->err);
    if (rc) return preset ? fail(w, preset->line, "%s", w->err->msg) : rc;
    for (int i = 0; i < x->base.n && !rc; i++) rc = apply(w, cfg, &x->base.items[i]);
    if (r->variant >= 0)
        for (int i = 0; i < x->variants[r->variant].set.n && !rc; i++) rc = apply(w, cfg, &x->variants[r->variant].set.items[i]);
    for (int a = 0; a < x->naxes && !rc; a++)
        if (axis_value(x, r, a)) rc = apply(w, cfg, axis_value(x, r, a));
    if (x->nseeds) cfg->seed = r->seed;
    for (int i = 0; i < x->cli.n && !rc; i++) rc = apply(w, cfg, &x->cli.items[i]);
    if (rc) return rc;

    /* name: variant, axis values, seed. A value longer than 48 bytes shows its start and '~' and a hash of the
     * whole, and so does a name longer than r->name holds: runs that differ only past a cut keep distinct names. */
    char full[8192] = "", h[17];
    size_t len = 0;
#define APPEND(...) \
    do { \
        if (len < sizeof full) len += (size_t)snprintf(full + len, sizeof full - len, __VA_ARGS__); \
    } while (0)
    if (r->variant >= 0) APPEND("%s", x->variants[r->variant].name);
    for (int a = 0; a < x->naxes; a++) {
        const ml_override *o = axis_value(x, r, a);
        if (!o) continue;
        if (strlen(o->value) <= 48) {
            APPEND("%s%s=%s", len ? "," : "", x->axes[a].label, o->value);
        } else {
            rundb_config_hash(o->value, h);
            APPEND("%s%s=%.40s~%.6s", len ? "," : "", x->axes[a].label, o->value, h);
        }
    }
    if (x->nseeds) APPEND("%sseed=%" PRIu64, len ? "," : "", r->seed);
#undef APPEND
    if (len < sizeof r->name) {
        snprintf(r->name, sizeof r->name, "%.127s", full[0] ? full : "run");
    } else { /* hashes what fits in full: ~60 axes of <= 178 bytes each */
        rundb_config_hash(full, h);
        snprintf(r->name, sizeof r->name, "%.*s~%.8s", (int)sizeof r->name - 10, full, h);
    }
    const char *name = full[0] ? r->name : "";

    r->line = x->seeds_line;
    if (r->variant >= 0) r->line = x->variants[r->variant].line;
    for (int a = 0; a < x->naxes; a++)
        if (axis_value(x, r, a)) r->line = axis_value(x, r, a)->line;
    if (r->line <= 0) r->line = 1;

    /* id: <experiment>-<name>-<hash prefix>. When the name part is cut or sanitized, the whole hash follows it:
     * no two runs share a hash (check_unique), so no two share an id. */
    rundb_run_hash(cfg, r->hash);
    char id[sizeof r->id], part[sizeof r->name];
    snprintf(part, sizeof part, "%s", name);
    sanitize(part);
    char dotted[sizeof r->name];
    snprintf(dotted, sizeof dotted, "%s", name);
    for (char *c = dotted; *c; c++) *c = *c == ',' ? '.' : *c;
    const int exact = strlen(part) <= 57 && !strcmp(part, dotted); /* only the commas changed */
    snprintf(id, sizeof id, "%.60s%s%.*s", x->name, name[0] ? "-" : "", exact ? 57 : 48, part);
    sanitize(id);
    snprintf(r->id, sizeof r->id, "%.118s-%.*s", id, exact ? 6 : 16, r->hash);

    snprintf(cfg->run.experiment, sizeof cfg->run.experiment, "%s", x->name);
    snprintf(cfg->run.id, sizeof cfg->run.id, "%s", r->id);
    snprintf(cfg->run.name, sizeof cfg->run.name, "%.127s", r->name);
    if ((size_t)snprintf(cfg->run.dir, sizeof cfg->run.dir, "%s/%s", runs_dir, r->id) >= sizeof cfg->run.dir)
        return fail(w, r->line, "--runs-dir '%s' is too long", runs_dir);
    cfg->run.resume[0] = 0;

    ml_err e = {0};
    if (config_validate(cfg, &e)) {
        /* blame the line that set the key the message names */
        char key[128] = "";
        const char *colon = strchr(e.msg, ':');
        if (colon && (size_t)(colon - e.msg) < sizeof key) memcpy(key, e.msg, (size_t)(colon - e.msg)), key[colon - e.msg] = 0;
        const ml_override *src = source_of(x, r, key);
        int line = src ? src->line : (x->base.n ? x->base.items[0].line : r->line);
        return fail(w, line, "%s (run %s)", e.msg, r->name);
    }
    return ML_OK;
}

static int cmp_hash(const void *a, const void *b) {
    return strcmp((*(ml_run_spec *const *)a)->hash, (*(ml_run_spec *const *)b)->hash);
}
static int cmp_id(const void *a, const void *b) {
    return strcmp((*(ml_run_spec *const *)a)->id, (*(ml_run_spec *const *)b)->id);
}
static int cmp_name(const void *a, const void *b) {
    return strcmp((*(ml_run_spec *const *)a)->name, (*(ml_run_spec *const *)b)->name);
}

/* No two runs may share a resolved config (a value that changes nothing) or a name. */
static int check_unique(walk *w, ml_experiment *x) {
    ml_run_spec **order = malloc((size_t)x->nruns * sizeof *order);
    if (!order) return fail(w, 1, "out of memory");
    for (int i = 0; i < x->nruns; i++) order[i] = &x->runs[i];
    int rc = ML_OK;
    qsort(order, (size_t)x->nruns, sizeof *order, cmp_hash);
    for (int i = 1; i < x->nruns && !rc; i++)
        if (!strcmp(order[i - 1]->hash, order[i]->hash)) {
            ml_run_spec *later = order[i - 1] > order[i] ? order[i - 1] : order[i];
            ml_run_spec *earlier = later == order[i] ? order[i - 1] : order[i];
            rc = fail(w, later->line, "runs '%s' and '%s' have the same config (a value that changes nothing?)",
                      earlier->name, later->name);
        }
    qsort(order, (size_t)x->nruns, sizeof *order, cmp_id);
    for (int i = 1; i < x->nruns && !rc; i++)
        if (!strcmp(order[i - 1]->id, order[i]->id))
            rc = fail(w, order[i]->line, "runs '%s' and '%s' would share the id %s", order[i - 1]->name, order[i]->name,
                      order[i]->id);
    qsort(order, (size_t)x->nruns, sizeof *order, cmp_name);
    for (int i = 1; i < x->nruns && !rc; i++)
        if (!strcmp(order[i - 1]->name, order[i]->name))
            rc = fail(w, order[i]->line, "two runs are named '%s'", order[i]->name);
    free(order);
    return rc;
}

static int expand(walk *w, ml_experiment *x, const char *runs_dir) {
    long grid = 1;
    for (int a = 0; a < x->naxes; a++) {
        grid *= x->axes[a].values.n;
        if (grid > ML_MAX_RUNS) grid = ML_MAX_RUNS + 1;
    }
    const int nvar = x->nvariants ? x->nvariants : 1, nseed = x->nseeds ? x->nseeds : 1;
    long total = 0;
    for (int v = 0; v < nvar; v++) total += (!x->nvariants || x->variants[v].cross) ? grid : 1;
    total *= nseed;
    if (total > ML_MAX_RUNS)
        return fail(w, x->naxes ? x->axes[0].line : x->seeds_line, "the experiment expands to %s%ld runs (at most %d)",
                    total > ML_MAX_RUNS ? "more than " : "", total > ML_MAX_RUNS ? (long)ML_MAX_RUNS : total, ML_MAX_RUNS);
    if (!(x->runs = calloc((size_t)total, sizeof *x->runs))) return fail(w, 1, "out of memory");
    int rc = ML_OK;
    for (int v = 0; v < nvar && !rc; v++) {
        const int crossed = !x->nvariants || x->variants[v].cross;
        const long combos = crossed ? grid : 1;
        for (long c = 0; c < combos && !rc; c++)
            for (int s = 0; s < nseed && !rc; s++) {
                ml_run_spec *r = &x->runs[x->nruns];
                r->variant = x->nvariants ? v : -1;
                r->seed = x->nseeds ? x->seeds[s] : 0;
                if (!(r->axis_index = malloc((size_t)(x->naxes ? x->naxes : 1) * sizeof(int))))
                    return fail(w, 1, "out of memory");
                x->nruns++;
                long rest = c; /* mixed-radix digits of c, last axis fastest */
                for (int a = x->naxes - 1; a >= 0; a--) {
                    r->axis_index[a] = crossed ? (int)(rest % x->axes[a].values.n) : -1;
                    if (crossed) rest /= x->axes[a].values.n;
                }
                rc = resolve(w, x, r, runs_dir);
            }
    }
    return rc ? rc : check_unique(w, x);
}

static int default_name(walk *w, ml_experiment *x) {
    const char *base = strrchr(x->path, '/');
    base = base ? base + 1 : x->path;
    if (strlen(base) >= sizeof x->name) return fail(w, 1, "name: the file name is too long; give a name with name:");
    snprintf(x->name, sizeof x->name, "%.63s", base);
    char *dot = strrchr(x->name, '.');
    if (dot && (!strcmp(dot, ".yaml") || !strcmp(dot, ".yml"))) *dot = 0;
    if (!valid_name(x->name))
        return fail(w, 1, "name: the file name '%s' is not a valid experiment name; give one with name:", base);
    return ML_OK;
}

static int cli_overrides(walk *w, ml_experiment *x, int n, char *const *overrides) {
    for (int i = 0; i < n; i++) {
        const char *eq = strchr(overrides[i], '=');
        if (!eq || eq == overrides[i]) return fail(w, 0, "'%s': expected key=value", overrides[i]);
        char key[128];
        if ((size_t)(eq - overrides[i]) >= sizeof key) return fail(w, 0, "'%.40s': key too long", overrides[i]);
        memcpy(key, overrides[i], (size_t)(eq - overrides[i]));
        key[eq - overrides[i]] = 0;
        int j = ov_find(&x->cli, key);
        if (j >= 0) { /* the later one wins, as on a shell command line */
            free(x->cli.items[j].value);
            memmove(&x->cli.items[j], &x->cli.items[j + 1], (size_t)(x->cli.n - j - 1) * sizeof x->cli.items[0]);
            x->cli.n--;
        }
        int rc = ov_add(w, &x->cli, key, eq + 1, 0, 1);
        if (rc) return rc;
        if (x->nseeds && !strcmp(key, "seed")) return fail(w, 0, "seed: the file gives seeds: (line %d)", x->seeds_line);
    }
    return ML_OK;
}

int experiment_parse(ml_experiment *x, const char *text, size_t len, const char *path, int noverrides,
                     char *const *overrides, const char *runs_dir, ml_err *err) {
    memset(x, 0, sizeof *x);
    snprintf(x->path, sizeof x->path, "%s", path);
    walk w = {.path = x->path, .err = err};
    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser)) return ml_errf(err, ML_ERUN, "%s: cannot start the YAML parser", path);
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    int rc = ML_OK;
    if (!yaml_parser_load(&parser, &doc)) {
        rc = ml_errf(err, ML_EINPUT, "%.200s:%d: YAML: %s%s%s", path, (int)parser.problem_mark.line + 1,
                     parser.problem ? parser.problem : "malformed", parser.context ? " " : "",
                     parser.context ? parser.context : "");
        yaml_parser_delete(&parser);
        return rc;
    }
    w.doc = &doc;
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) {
        rc = ml_errf(err, ML_EINPUT, "%.200s:1: the file is empty (an experiment needs at least base:)", path);
    } else {
        /* a second document is a mistake (a stray '---'), not something to ignore */
        yaml_document_t next;
        if (yaml_parser_load(&parser, &next)) {
            if (yaml_document_get_root_node(&next))
                rc = fail(&w, (int)next.start_mark.line + 1, "a second YAML document; an experiment file holds one");
            yaml_document_delete(&next);
        } else {
            rc = ml_errf(err, ML_EINPUT, "%.200s:%d: YAML: %s", path, (int)parser.problem_mark.line + 1,
                         parser.problem ? parser.problem : "malformed");
        }
        if (!rc) rc = parse_root(&w, x, root);
    }
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    if (!rc && !x->name[0]) rc = default_name(&w, x);
    if (!rc) rc = cli_overrides(&w, x, noverrides, overrides);
    if (!rc) rc = cross_checks(&w, x);
    if (!rc) rc = expand(&w, x, runs_dir && runs_dir[0] ? runs_dir : "runs");
    if (rc) experiment_free(x);
    return rc;
}

int experiment_load(ml_experiment *x, const char *path, int noverrides, char *const *overrides, const char *runs_dir,
                    ml_err *err) {
    memset(x, 0, sizeof *x);
    FILE *f = fopen(path, "rb");
    if (!f) return ml_errf(err, ML_EINPUT, "%s: %s", path, strerror(errno));
    char *text = NULL;
    size_t len = 0, cap = 0, n;
    int rc = ML_OK;
    for (;;) {
        if (len + 65536 > cap) {
            cap = cap ? 2 * cap : 65536;
            char *grown = cap > MAX_FILE + 65536 ? NULL : realloc(text, cap);
            if (!grown) {
                rc = ml_errf(err, ML_EINPUT, "%s: larger than %d MiB; not an experiment file", path, MAX_FILE >> 20);
                break;
            }
            text = grown;
        }
        if ((n = fread(text + len, 1, cap - len, f)) == 0) break;
        len += n;
    }
    if (!rc && ferror(f)) rc = ml_errf(err, ML_EINPUT, "%s: %s", path, strerror(errno));
    fclose(f);
    if (!rc) rc = experiment_parse(x, text, len, path, noverrides, overrides, runs_dir, err);
    free(text);
    return rc;
}

void experiment_free(ml_experiment *x) {
    ov_free(&x->base);
    ov_free(&x->cli);
    for (int v = 0; v < x->nvariants; v++) ov_free(&x->variants[v].set);
    for (int a = 0; a < x->naxes; a++) ov_free(&x->axes[a].values);
    for (int r = 0; r < x->nruns; r++) free(x->runs[r].axis_index);
    free(x->variants), free(x->axes), free(x->seeds), free(x->runs), free(x->description);
    memset(x, 0, sizeof *x);
}
