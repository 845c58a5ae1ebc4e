/* test_experiment.c: experiment files (core/experiment.h). In-memory YAML checks the expansion: grid counts and
 * the exact values that reach run.cfg, crossed and stand-alone variants, seeds, nested keys, lists given to text
 * keys, precedence (preset, base, variant, axis, seed, command line), run names, ids and folders, run identity
 * (hashes stable across parses, changed by any key, kept when an axis grows) and the params rows the run
 * database gets. Then every file of argv[1]/good must load, and every file of argv[1]/bad must be rejected with
 * the line and message its first line names:  # expect: <line>: <substring of the message> */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "experiment.h"
#include "rundb.h"

#include "check.h"

#define NOV 0, NULL

static int parse(ml_experiment *x, const char *text, int nov, char *const *ov, ml_err *err) {
    return experiment_parse(x, text, strlen(text), "mem.yaml", nov, ov, "runs", err);
}

/* Parses text that must be accepted; on failure reports the message and returns 0 (x is then empty). */
static int parse_ok(ml_experiment *x, const char *what, const char *text, int nov, char *const *ov) {
    ml_err err = {0};
    int rc = parse(x, text, nov, ov, &err);
    CHECK(rc == ML_OK, "%s: expected to parse, got %d '%s'", what, rc, err.msg);
    return rc == ML_OK;
}

/* Parses text that must be rejected with want in the message (ML_EINPUT, nothing left allocated). */
static void parse_bad(const char *what, const char *text, int nov, char *const *ov, const char *want) {
    ml_experiment x;
    ml_err err = {0};
    int rc = parse(&x, text, nov, ov, &err);
    CHECK(rc == ML_EINPUT && strstr(err.msg, want), "%s: expected rejection naming '%s', got %d '%s'", what, want, rc,
          err.msg);
    CHECK(x.nruns == 0 && !x.runs && !x.variants && !x.axes && !x.seeds && !x.base.items,
          "%s: a rejected experiment holds nothing", what);
    if (rc == ML_OK) experiment_free(&x);
}

static int find_run(const ml_experiment *x, const char *name) {
    for (int r = 0; r < x->nruns; r++)
        if (!strcmp(x->runs[r].name, name)) return r;
    return -1;
}

static int find_variant(const ml_experiment *x, const char *name) {
    for (int v = 0; v < x->nvariants; v++)
        if (!strcmp(x->variants[v].name, name)) return v;
    return -1;
}

/* Names and ids unique; ids safe as folder names and SQL literals; run.* keys set from them. */
static void check_runs(const ml_experiment *x, const char *runs_dir, const char *what) {
    int bad_id = 0, dup = 0, bad_run = 0;
    for (int r = 0; r < x->nruns; r++) {
        const ml_run_spec *s = &x->runs[r];
        /* <experiment (up to 60 chars)>-...-<a prefix of the hash, at least 6 hex digits> */
        const size_t n = strlen(x->name) < 60 ? strlen(x->name) : 60;
        const char *suffix = strrchr(s->id, '-');
        const size_t sl = suffix ? strlen(suffix + 1) : 0;
        if (strpbrk(s->id, "/ '\"\\") || strncmp(s->id, x->name, n) || s->id[n] != '-' || sl < 6 || sl > 16 ||
            strncmp(suffix + 1, s->hash, sl))
            bad_id++, printf("  bad id '%s' (run '%s', hash %s)\n", s->id, s->name, s->hash);
        for (int q = 0; q < r; q++)
            if (!strcmp(x->runs[q].id, s->id) || !strcmp(x->runs[q].name, s->name)) dup++;
        char dir[1024], hash[17];
        snprintf(dir, sizeof dir, "%s/%s", runs_dir, s->id);
        rundb_run_hash(&s->cfg, hash);
        if (strcmp(s->cfg.run.experiment, x->name) || strcmp(s->cfg.run.id, s->id) ||
            strcmp(s->cfg.run.name, s->name) || strcmp(s->cfg.run.dir, dir) || strcmp(hash, s->hash) ||
            s->cfg.run.resume[0] || strlen(s->hash) != 16)
            bad_run++, printf("  run %d '%s': run.experiment '%s' run.id '%s' run.name '%s' run.dir '%s'\n", r, s->name,
                              s->cfg.run.experiment, s->cfg.run.id, s->cfg.run.name, s->cfg.run.dir);
    }
    CHECK(!bad_id, "%s: %d ids break the id rules", what, bad_id);
    CHECK(!dup, "%s: %d runs share a name or id", what, dup);
    CHECK(!bad_run, "%s: %d runs with wrong run.* keys or hash", what, bad_run);
}

/* ---- expansion ---- */

static void test_grid(void) {
    const char *text = "name: grid\n"
                       "base: {preset: tiny, train.steps: 10}\n"
                       "sweep:\n"
                       "  balance.aux_coef: [1e-3, 0.02, 1.5e-1]\n"
                       "  model.top_k: [1, 2]\n";
    const char *coefs[] = {"1e-3", "0.02", "1.5e-1"}, *ks[] = {"1", "2"};
    ml_experiment x;
    if (!parse_ok(&x, "grid", text, NOV)) return;
    CHECK(x.nruns == 6 && x.naxes == 2 && x.nvariants == 0 && x.nseeds == 0, "grid: 3 x 2 = 6 runs, got %d", x.nruns);
    CHECK(!strcmp(x.axes[0].key, "balance.aux_coef") && !strcmp(x.axes[0].label, "aux_coef") && x.axes[0].line == 4 &&
              x.axes[0].values.n == 3 && !strcmp(x.axes[1].label, "top_k") && x.axes[1].values.n == 2,
          "grid: axes in file order with labels and lines");
    int seen[3][2] = {{0}};
    for (int r = 0; r < x.nruns; r++) {
        const ml_run_spec *s = &x.runs[r];
        int i = s->axis_index[0], j = s->axis_index[1];
        CHECK(i >= 0 && i < 3 && j >= 0 && j < 2 && s->variant == -1, "grid: run %d indices %d %d", r, i, j);
        if (i < 0 || i >= 3 || j < 0 || j >= 2) continue;
        seen[i][j]++;
        CHECK(s->cfg.balance.aux_coef == strtof(coefs[i], NULL), "grid: run %s aux_coef %.9g, want %s", s->name,
              s->cfg.balance.aux_coef, coefs[i]);
        CHECK(s->cfg.model.top_k == atoi(ks[j]), "grid: run %s top_k %d", s->name, s->cfg.model.top_k);
        CHECK(!strcmp(experiment_axis_value(&x, r, 0), coefs[i]) && !strcmp(experiment_axis_value(&x, r, 1), ks[j]),
              "grid: axis values of run %d are the text as written", r);
        char name[64];
        snprintf(name, sizeof name, "aux_coef=%s,top_k=%s", coefs[i], ks[j]);
        CHECK(!strcmp(s->name, name), "grid: run named '%s', want '%s'", s->name, name);
        CHECK(s->cfg.train.steps == 10 && s->cfg.model.experts == 8 && s->cfg.seed == 1337 &&
                  !strcmp(s->cfg.preset, "tiny"),
              "grid: base keys and preset defaults reach every run");
        CHECK(s->line == 5, "grid: run %d's line is that of its last axis value, got %d", r, s->line);
    }
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 2; j++) CHECK(seen[i][j] == 1, "grid: combination %s x %s seen %d times", coefs[i], ks[j], seen[i][j]);
    /* mixed-radix order, last axis fastest */
    CHECK(x.runs[0].axis_index[0] == 0 && x.runs[0].axis_index[1] == 0 && x.runs[1].axis_index[1] == 1 &&
              x.runs[2].axis_index[0] == 1,
          "grid: runs ordered with the last axis fastest");
    CHECK(!strcmp(x.name, "grid") && !x.description, "grid: name, no description");
    check_runs(&x, "runs", "grid");
    experiment_free(&x);
    CHECK(x.nruns == 0 && !x.runs, "experiment_free clears the struct");

    /* three axes, one of them a string */
    if (parse_ok(&x, "grid3",
                 "sweep:\n  train.lr: [1e-3, 3e-3]\n  model.norm_topk: [true, false]\n"
                 "  balance.policy: [aux_loss, aux_loss+z_loss, \"seq_aux_loss\"]\n",
                 NOV)) {
        CHECK(x.nruns == 12, "grid3: 2 x 2 x 3 = 12 runs, got %d", x.nruns);
        int r = find_run(&x, "lr=3e-3,norm_topk=false,policy=aux_loss+z_loss");
        CHECK(r >= 0 && x.runs[r].cfg.train.lr == strtof("3e-3", NULL) && x.runs[r].cfg.model.norm_topk == 0 &&
                  !strcmp(x.runs[r].cfg.balance.policy, "aux_loss+z_loss"),
              "grid3: values of lr=3e-3,norm_topk=false,policy=aux_loss+z_loss");
        r = find_run(&x, "lr=1e-3,norm_topk=true,policy=seq_aux_loss");
        CHECK(r >= 0 && !strcmp(x.runs[r].cfg.balance.policy, "seq_aux_loss"), "grid3: a quoted value loses its quotes");
        check_runs(&x, "runs", "grid3");
        experiment_free(&x);
    }
}

static void test_variants(void) {
    const char *text = "name: lbl\n"
                       "base: {preset: tiny, train.steps: 10}\n"
                       "sweep: {balance.aux_coef: [1e-3, 1e-2, 1e-1]}\n"
                       "variants:\n"
                       "  aux: {balance.policy: aux_loss}\n"
                       "  zl: {balance.policy: aux_loss+z_loss}\n"
                       "  lf:\n"
                       "    cross: false\n"
                       "    balance.policy: loss_free\n"
                       "seeds: [1, 2]\n";
    ml_experiment x;
    if (!parse_ok(&x, "variants", text, NOV)) return;
    CHECK(x.nvariants == 3 && x.nruns == (3 + 3 + 1) * 2, "variants: (3 + 3 + 1) x 2 seeds = 14 runs, got %d", x.nruns);
    const int lf = find_variant(&x, "lf"), aux = find_variant(&x, "aux");
    CHECK(lf == 2 && aux == 0 && x.variants[lf].cross == 0 && x.variants[aux].cross == 1 && x.variants[lf].line == 7,
          "variants: cross defaults to true, cross: false read, file order kept");
    CHECK(x.variants[lf].set.n == 1 && !strcmp(x.variants[lf].set.items[0].key, "balance.policy"),
          "variants: cross is not a config key of the variant");
    int alone = 0, crossed = 0;
    for (int r = 0; r < x.nruns; r++) {
        const ml_run_spec *s = &x.runs[r];
        if (s->variant == lf) {
            alone++;
            CHECK(s->axis_index[0] == -1 && experiment_axis_value(&x, r, 0) == NULL,
                  "variants: a stand-alone run has no axis value");
            CHECK(!strcmp(s->cfg.balance.policy, "loss_free") && s->cfg.balance.aux_coef == 0.01f &&
                      s->cfg.train.steps == 10,
                  "variants: stand-alone run keeps the base value of the swept key");
            CHECK(s->line == 7, "variants: a stand-alone run's line is its variant's, got %d", s->line);
        } else {
            crossed++;
            const char *v = experiment_axis_value(&x, r, 0);
            CHECK(v && s->cfg.balance.aux_coef == strtof(v, NULL), "variants: crossed run %s gets the axis value",
                  s->name);
            CHECK(!strcmp(s->cfg.balance.policy, x.variants[s->variant].set.items[0].value),
                  "variants: run %s has its variant's policy", s->name);
        }
    }
    CHECK(alone == 2 && crossed == 12, "variants: 2 stand-alone and 12 crossed runs, got %d and %d", alone, crossed);
    CHECK(find_run(&x, "lf,seed=1") >= 0 && find_run(&x, "lf,seed=2") >= 0 && find_run(&x, "zl,aux_coef=1e-1,seed=2") >= 0,
          "variants: names 'variant,label=value,seed=N'");
    check_runs(&x, "runs", "variants");
    experiment_free(&x);

    /* cross: false alone (no sweep): one run per seed */
    if (parse_ok(&x, "alone", "variants:\n  only: {cross: off, model.top_k: 1}\nseeds: 3\n", NOV)) {
        CHECK(x.nruns == 3 && x.naxes == 0 && x.runs[0].cfg.model.top_k == 1 && !strcmp(x.runs[2].name, "only,seed=3"),
              "alone: one run per seed");
        experiment_free(&x);
    }
    /* crossed variants on the same key with different values are different runs */
    if (parse_ok(&x, "cross: yes", "sweep: {train.lr: [1e-3, 2e-3]}\nvariants:\n  a: {cross: yes, model.top_k: 1}\n"
                                   "  b: {cross: true, model.top_k: 2}\n",
                 NOV)) {
        CHECK(x.nruns == 4 && x.variants[0].cross && x.variants[1].cross, "cross: yes / true mean crossed");
        experiment_free(&x);
    }
}

/* An empty variant is the base config itself: `baseline: {}`, `baseline:` and `baseline: ~` agree. */
static void test_empty_variants(void) {
    ml_experiment x, y;
    /* base: alone is one run, the default preset */
    if (parse_ok(&x, "base alone", "base:\n", NOV)) {
        ml_config tiny;
        char hash[17];
        config_preset(&tiny, "tiny", NULL);
        rundb_run_hash(&tiny, hash);
        CHECK(x.nruns == 1 && !strcmp(x.runs[0].name, "run") && x.runs[0].variant == -1 && !strcmp(x.name, "mem"),
              "base alone: one run named 'run' in experiment 'mem' (the file's name)");
        CHECK(x.nruns == 1 && !strcmp(x.runs[0].hash, hash), "base alone: the run is preset tiny (hash %s vs %s)",
              x.nruns ? x.runs[0].hash : "", hash);
        check_runs(&x, "runs", "base alone");
        experiment_free(&x);
    }
    const char *forms[] = {"baseline: {}", "baseline:", "baseline: ~", "baseline: null", "baseline: {cross: true}"};
    const char *fmt = "base: {train.steps: 10}\n"
                      "sweep: {balance.aux_coef: [1e-3, 1e-1]}\n"
                      "variants:\n"
                      "  %s\n"
                      "  stronger: {train.lr: 1e-2}\n"
                      "  plain: {cross: false}\n";
    char text[512];
    snprintf(text, sizeof text, fmt, forms[0]);
    if (!parse_ok(&y, "baseline: {}", text, NOV)) return;
    CHECK(y.nruns == 2 + 2 + 1, "baseline: {}: 2 + 2 + 1 runs, got %d", y.nruns);
    int r = find_run(&y, "baseline,aux_coef=1e-1"), p = find_run(&y, "plain");
    CHECK(r >= 0 && y.runs[r].cfg.train.steps == 10 && y.runs[r].cfg.train.lr == 3e-3f &&
              y.runs[r].cfg.balance.aux_coef == strtof("1e-1", NULL),
          "baseline: {}: a crossed empty variant is base + axis");
    CHECK(p >= 0 && y.runs[p].cfg.balance.aux_coef == 0.01f && y.runs[p].cfg.train.steps == 10 &&
              y.runs[p].axis_index[0] == -1,
          "plain: cross: false alone is the base config");
    for (int f = 1; f < 5; f++) {
        snprintf(text, sizeof text, fmt, forms[f]);
        if (!parse_ok(&x, forms[f], text, NOV)) continue;
        int same = x.nruns == y.nruns;
        for (int i = 0; same && i < x.nruns; i++)
            same = !strcmp(x.runs[i].hash, y.runs[i].hash) && !strcmp(x.runs[i].id, y.runs[i].id);
        CHECK(same, "'%s' expands exactly as 'baseline: {}'", forms[f]);
        CHECK(x.variants[0].set.n == 0 && x.variants[0].cross == 1, "'%s': no keys, crossed", forms[f]);
        experiment_free(&x);
    }
    experiment_free(&y);
    /* empty sections */
    if (parse_ok(&x, "empty sections", "name: e\ndescription: d\nbase:\nvariants:\nseeds:\n", NOV)) {
        CHECK(x.nruns == 1 && x.naxes == 0 && x.nvariants == 0 && x.nseeds == 0 && !strcmp(x.description, "d"),
              "empty sections: one run");
        experiment_free(&x);
    }
    /* sweep: without axes is a mistake, not an empty section */
    parse_bad("sweep: alone", "base:\nsweep:\n", NOV, "mem.yaml:2: sweep: empty");
}

static void test_seeds(void) {
    ml_experiment x;
    const char *text = "sweep: {model.top_k: [1, 2]}\n"
                       "variants:\n  a: {}\n  b: {train.lr: 1e-2}\n  c: {cross: false, train.lr: 2e-2}\n"
                       "seeds: 4\n";
    if (parse_ok(&x, "seeds count", text, NOV)) {
        CHECK(x.nseeds == 4 && x.seeds[0] == 1 && x.seeds[3] == 4 && x.seeds_line == 6, "seeds: 4 means seeds 1..4");
        CHECK(x.nruns == (2 + 2 + 1) * 4, "seeds count: (2 + 2 + 1) variants/values x 4 seeds = 20 runs, got %d",
              x.nruns);
        int count[3][3][5] = {{{0}}}, bad = 0; /* variant, axis index + 1, seed */
        for (int r = 0; r < x.nruns; r++) {
            const ml_run_spec *s = &x.runs[r];
            if (s->seed < 1 || s->seed > 4 || s->cfg.seed != s->seed || s->variant < 0) {
                bad++;
                continue;
            }
            count[s->variant][s->axis_index[0] + 1][s->seed]++;
        }
        int once = !bad;
        for (int v = 0; v < 3; v++)
            for (int a = 0; a < 3; a++)
                for (int sd = 1; sd <= 4; sd++) {
                    int want = v == 2 ? a == 0 : a > 0;
                    once &= count[v][a][sd] == want;
                }
        CHECK(once, "seeds count: every (variant, value, seed) once, seed reaches cfg.seed");
        check_runs(&x, "runs", "seeds count");
        experiment_free(&x);
    }
    if (parse_ok(&x, "seeds list", "base: {seed: 5}\nvariants: {a: {}, b: {model.top_k: 1}}\n", NOV)) {
        CHECK(x.nruns == 2 && x.runs[0].cfg.seed == 5 && x.runs[0].seed == 0 && !strcmp(x.runs[0].name, "a"),
              "no seeds: base seed: kept, names without seed=");
        experiment_free(&x);
    }
    if (parse_ok(&x, "seeds list", "seeds: [7, 3, 18446744073709551615, 0]\n", NOV)) {
        CHECK(x.nseeds == 4 && x.seeds[0] == 7 && x.seeds[1] == 3 && x.seeds[2] == UINT64_MAX && x.seeds[3] == 0 &&
                  x.nruns == 4,
              "seeds list: order kept, full uint64 range");
        CHECK(x.runs[1].cfg.seed == 3 && !strcmp(x.runs[1].name, "seed=3") &&
                  x.runs[2].cfg.seed == UINT64_MAX && !strcmp(x.runs[2].name, "seed=18446744073709551615"),
              "seeds list: seed reaches cfg.seed and the name");
        experiment_free(&x);
    }
}

static void test_nested_and_lists(void) {
    const char *text = "base:\n"
                       "  preset: tiny\n"
                       "  train: {steps: 12, lr: 0.002}\n"
                       "  model:\n"
                       "    experts: 16\n"
                       "    layer_top_k: [2, 1]\n"
                       "  balance.policy: aux_loss+topk_schedule\n"
                       "  balance:\n"
                       "    topk_stages:\n"
                       "      - {layers: \"[2]*2\", until_tokens: 1e4}\n"
                       "      - layers: '[1]*2'\n"
                       "sweep:\n"
                       "  train:\n"
                       "    warmup: [0, 5]\n"
                       "variants:\n"
                       "  zl:\n"
                       "    balance: {z_coef: 0.01}\n"
                       "    model:\n"
                       "      layer_top_k:\n"
                       "        - 1\n"
                       "        - 2\n";
    ml_experiment x;
    if (!parse_ok(&x, "nested", text, NOV)) return;
    const char *keys[] = {"preset", "train.steps", "train.lr", "model.experts", "model.layer_top_k", "balance.policy",
                          "balance.topk_stages"};
    int ok = x.base.n == 7;
    for (int i = 0; ok && i < 7; i++) ok = !strcmp(x.base.items[i].key, keys[i]);
    CHECK(ok, "nested: base flattens to dotted keys in file order (%d keys)", x.base.n);
    CHECK(x.base.n == 7 && x.base.items[1].line == 3 && x.base.items[4].line == 6 && x.base.items[6].line == 9,
          "nested: each key keeps its line");
    CHECK(x.naxes == 1 && !strcmp(x.axes[0].key, "train.warmup") && !strcmp(x.axes[0].label, "warmup") &&
              x.axes[0].line == 14,
          "nested: sweep axis key joined");
    CHECK(x.nvariants == 1 && x.variants[0].set.n == 2 && !strcmp(x.variants[0].set.items[0].key, "balance.z_coef") &&
              !strcmp(x.variants[0].set.items[1].key, "model.layer_top_k") &&
              !strcmp(x.variants[0].set.items[1].value, "[1, 2]"),
          "nested: variant keys joined; a block list becomes flow text");
    CHECK(x.nruns == 2, "nested: 2 runs, got %d", x.nruns);
    for (int r = 0; r < x.nruns; r++) {
        const ml_config *c = &x.runs[r].cfg;
        ml_err err = {0};
        CHECK(c->train.steps == 12 && c->train.lr == 0.002f && c->model.experts == 16 &&
                  c->balance.z_coef == 0.01f && c->train.warmup == (r ? 5 : 0),
              "nested: run %d values", r);
        CHECK(!strcmp(c->model.layer_top_k, "[1, 2]"), "nested: variant's layer_top_k '%s'", c->model.layer_top_k);
        CHECK(!strcmp(c->balance.topk_stages, "[{layers: \"[2]*2\", until_tokens: 1e4}, {layers: \"[1]*2\"}]"),
              "nested: topk_stages flow text '%s'", c->balance.topk_stages);
        CHECK(config_validate(c, &err) == 0, "nested: run %d validates: %s", r, err.msg);
    }
    experiment_free(&x);
    if (parse_ok(&x, "layer_top_k list", "base: {model.layer_top_k: [2, 1]}\n", NOV)) {
        int k[ML_MAX_LAYERS];
        ml_err err = {0};
        CHECK(!strcmp(x.runs[0].cfg.model.layer_top_k, "[2, 1]") && config_layer_k(&x.runs[0].cfg, k, &err) == 0 &&
                  k[0] == 2 && k[1] == 1,
              "layer_top_k: [2, 1] becomes '[2, 1]' and expands to k = 2, 1");
        experiment_free(&x);
    }
    /* a list sweep axis of a text key: each value a list */
    if (parse_ok(&x, "list axis", "sweep:\n  model.layer_top_k:\n    - [2, 1]\n    - [1, 2]\n    - \"[1]*2\"\n", NOV)) {
        CHECK(x.nruns == 3 && !strcmp(x.runs[0].cfg.model.layer_top_k, "[2, 1]") &&
                  !strcmp(x.runs[2].cfg.model.layer_top_k, "[1]*2") && !strcmp(experiment_axis_value(&x, 1, 0), "[1, 2]"),
              "list axis: each list value becomes its flow text");
        check_runs(&x, "runs", "list axis");
        experiment_free(&x);
    }
    parse_bad("list to numeric key in sweep", "sweep:\n  train.steps: [[1, 2]]\n", NOV,
              "mem.yaml:2: train.steps: expected a single value, not a list");
    parse_bad("invalid flow text", "base: {model.layer_top_k: [2, x]}\n", NOV, "mem.yaml:1: model.layer_top_k:");
}

static void test_precedence(void) {
    const char *text = "base:\n"
                       "  preset: small-cpu\n"   /* 96 experts, top-1, dim 128, 4 layers */
                       "  model.dim: 64\n"
                       "  model.top_k: 2\n"
                       "  train.steps: 100\n"
                       "  train.warmup: 3\n"
                       "  train.batch: 2\n"
                       "  seed: 9\n"
                       "sweep:\n"
                       "  train.batch: [5, 6]\n"
                       "variants:\n"
                       "  v: {train.warmup: 4}\n"
                       "  w: {cross: false, preset: tiny, model.top_k: 3, train.batch: 7}\n";
    ml_experiment x;
    if (parse_ok(&x, "precedence", text, NOV)) {
        CHECK(x.nruns == 3, "precedence: 3 runs, got %d", x.nruns);
        int v5 = find_run(&x, "v,batch=5"), w = find_run(&x, "w");
        if (v5 >= 0 && w >= 0) {
            const ml_config *a = &x.runs[v5].cfg, *b = &x.runs[w].cfg;
            CHECK(!strcmp(a->preset, "small-cpu") && a->model.experts == 96 && a->model.layers == 4,
                  "precedence: base preset applied first");
            CHECK(a->model.dim == 64 && a->model.top_k == 2 && a->train.steps == 100 && a->seed == 9,
                  "precedence: base keys over the preset");
            CHECK(a->train.warmup == 4, "precedence: variant over base (warmup %d)", a->train.warmup);
            CHECK(a->train.batch == 5, "precedence: axis over base (batch %d)", a->train.batch);
            CHECK(!strcmp(b->preset, "tiny") && b->model.experts == 8 && b->model.dim == 64 && b->train.steps == 100,
                  "precedence: a variant's preset replaces base's, base keys still apply");
            CHECK(b->model.top_k == 3 && b->train.batch == 7 && b->train.warmup == 3,
                  "precedence: stand-alone variant over base, no axis");
        }
        experiment_free(&x);
    }
    /* command-line overrides win over everything; the later of two wins */
    char *ov[] = {"train.steps=8", "model.top_k=4", "train.steps=7", "train.warmup=1"};
    if (parse_ok(&x, "overrides", text, 4, ov)) {
        int all = x.nruns == 3 && x.cli.n == 3;
        for (int r = 0; all && r < x.nruns; r++) {
            const ml_config *c = &x.runs[r].cfg;
            all = c->train.steps == 7 && c->model.top_k == 4 && c->train.warmup == 1 && c->model.dim == 64 &&
                  c->train.batch == (x.runs[r].variant == 1 ? 7 : 5 + x.runs[r].axis_index[0]);
        }
        CHECK(all, "overrides: train.steps=7, model.top_k=4, train.warmup=1 win in every run");
        CHECK(x.cli.n == 3 && x.cli.items[0].line == 0, "overrides: kept with line 0");
        experiment_free(&x);
    }
    /* overriding a swept key makes the axis change nothing */
    char *swept[] = {"train.batch=3"};
    parse_bad("override of a swept key", text, 1, swept, "have the same config");
    /* a command-line preset is applied first too: the file's keys still win over it */
    char *preset[] = {"preset=tiny"};
    if (parse_ok(&x, "preset override", "base: {preset: small-cpu, model.dim: 64}\nseeds: [1, 2]\n", 1, preset)) {
        CHECK(x.nruns == 2 && !strcmp(x.runs[0].cfg.preset, "tiny") && x.runs[0].cfg.model.experts == 8 &&
                  x.runs[0].cfg.model.dim == 64 && x.runs[1].cfg.seed == 2,
              "preset override: command-line preset first, base keys after, seeds after");
        experiment_free(&x);
    }
    /* axis over variant for a stand-alone variant is impossible (no axis); axis over base: */
    if (parse_ok(&x, "axis over base", "base: {train.lr: 5e-3}\nsweep: {train.lr: [1e-3]}\n", NOV)) {
        CHECK(x.nruns == 1 && x.runs[0].cfg.train.lr == 1e-3f, "axis over base");
        experiment_free(&x);
    }
    /* seeds over base preset and over a variant's preset */
    if (parse_ok(&x, "seeds over preset", "variants:\n  t: {preset: tiny}\nseeds: [42]\n", NOV)) {
        CHECK(x.nruns == 1 && x.runs[0].cfg.seed == 42, "seeds over a variant's preset");
        experiment_free(&x);
    }
    char *seed[] = {"seed=3"};
    parse_bad("seed override with seeds", "seeds: 2\n", 1, seed, "command line: seed: the file gives seeds: (line 1)");
    char *bogus[] = {"model.bogus=1"};
    parse_bad("unknown override", "base:\n", 1, bogus, "command line: model.bogus: unknown key");
    char *noeq[] = {"train.steps"};
    parse_bad("override without =", "base:\n", 1, noeq, "command line: 'train.steps': expected key=value");
    char *runid[] = {"run.id=x"};
    parse_bad("run.id override", "base:\n", 1, runid, "command line: run.id: set by moelab");
    char *badval[] = {"model.top_k=99"};
    parse_bad("override fails validation", "seeds: 1\n", 1, badval, "command line: model.top_k: k=99 must be in [1, model.experts=8]");
    char *rundb[] = {"run.db=other.db"};
    if (parse_ok(&x, "run.db override", "base: {run.db: mine.db}\n", 1, rundb)) {
        CHECK(!strcmp(x.runs[0].cfg.run.db, "other.db"), "run.db may be set (file, command line)");
        experiment_free(&x);
    }
}

static void test_names(void) {
    ml_experiment x;
    const char *text = "sweep:\n  data.dir: [\"a b\", x/y, 'q\"z', \"it's\", \"t\\\\u\"]\n";
    if (experiment_parse(&x, text, strlen(text), "some/dir/odd-name.v2.yaml", 0, NULL, "/tmp/somewhere/runs",
                         &(ml_err){0}) == ML_OK) {
        CHECK(!strcmp(x.name, "odd-name.v2"), "names: experiment named after the file ('%s')", x.name);
        CHECK(x.nruns == 5 && !strcmp(x.runs[1].cfg.data.dir, "x/y") && !strcmp(x.runs[2].cfg.data.dir, "q\"z"),
              "names: text values reach cfg as written");
        CHECK(!strcmp(x.runs[0].name, "dir=a b"), "names: the name shows the value ('%s')", x.runs[0].name);
        check_runs(&x, "/tmp/somewhere/runs", "names");
        CHECK(!strncmp(x.runs[1].id, "odd-name.v2-dir=x_y-", 20), "names: '/' in an id becomes '_' ('%s')",
              x.runs[1].id);
        experiment_free(&x);
    } else {
        CHECK(0, "names: parse failed");
    }
    if (experiment_parse(&x, "base:\n", 6, "x.yml", 0, NULL, "", &(ml_err){0}) == ML_OK) {
        CHECK(!strcmp(x.name, "x") && !strncmp(x.runs[0].cfg.run.dir, "runs/x-", 7),
              "names: .yml stripped, empty runs_dir means runs");
        experiment_free(&x);
    }
    ml_err err = {0};
    CHECK(experiment_parse(&x, "base:\n", 6, "my exp.yaml", 0, NULL, "runs", &err) == ML_EINPUT &&
              strstr(err.msg, "my exp.yaml:1: name: the file name 'my exp.yaml' is not a valid experiment name"),
          "names: a file name that is no experiment name needs name: ('%s')", err.msg);
    CHECK(experiment_parse(&x, "name: ok\nbase:\n", 15, "my exp.yaml", 0, NULL, "runs", &err) == ML_OK &&
              !strcmp(x.name, "ok"),
          "names: name: overrides the file name");
    experiment_free(&x); /* a failed parse leaves x empty, so this is safe either way */
    /* long values and many axes still give ids of bounded length */
    const char *longer = "name: a-rather-long-experiment-name-that-goes-on-and-on-for-60-chars\n"
                         "variants:\n  a-rather-long-variant-name-too: {}\n  b: {train.lr: 1e-2}\n"
                         "sweep:\n  train.warmup: [1, 2]\n  train.batch: [3, 4]\n  balance.aux_coef: [0.001, 0.002]\n"
                         "seeds: 2\n";
    if (parse_ok(&x, "long names", longer, NOV)) {
        int ok = x.nruns == 32;
        for (int r = 0; r < x.nruns; r++) ok &= strlen(x.runs[r].id) < sizeof x.runs[r].id;
        CHECK(ok, "long names: 32 runs with bounded ids");
        check_runs(&x, "runs", "long names");
        experiment_free(&x);
    }
}

/* ---- identity ---- */

static void test_identity(void) {
    const char *a = "name: id\nbase: {train.steps: 10}\nsweep: {balance.aux_coef: [1e-3, 1e-2]}\n"
                    "variants: {x: {}, y: {train.lr: 1e-2}, z: {cross: false, model.top_k: 1}}\nseeds: 2\n";
    const char *b = "name: id\nbase: {train.steps: 11}\nsweep: {balance.aux_coef: [1e-3, 1e-2]}\n"
                    "variants: {x: {}, y: {train.lr: 1e-2}, z: {cross: false, model.top_k: 1}}\nseeds: 2\n";
    const char *c = "name: id\nbase: {train.steps: 10}\nsweep: {balance.aux_coef: [1e-3, 3e-3, 1e-2]}\n"
                    "variants: {x: {}, y: {train.lr: 1e-2}, z: {cross: false, model.top_k: 1}}\nseeds: 2\n";
    const char *d = "name: other\nbase:\n  train:\n    steps: 10\nsweep: {balance.aux_coef: [1e-3, 1e-2]}\n"
                    "variants: {x: {}, y: {train.lr: 1e-2}, z: {cross: false, model.top_k: 1}}\nseeds: 2\n";
    ml_experiment xa, xa2, xb, xc, xd;
    if (!parse_ok(&xa, "identity a", a, NOV)) return;
    if (parse_ok(&xa2, "identity a again", a, NOV)) {
        int same = xa.nruns == xa2.nruns && xa.nruns == (2 + 2 + 1) * 2;
        for (int r = 0; same && r < xa.nruns; r++)
            same = !strcmp(xa.runs[r].hash, xa2.runs[r].hash) && !strcmp(xa.runs[r].id, xa2.runs[r].id) &&
                   !strcmp(xa.runs[r].name, xa2.runs[r].name);
        CHECK(same, "identity: the same file parsed twice gives the same runs, hashes and ids");
        experiment_free(&xa2);
    }
    if (parse_ok(&xb, "identity b", b, NOV)) {
        int differ = xb.nruns == xa.nruns;
        for (int r = 0; differ && r < xa.nruns; r++)
            for (int q = 0; q < xb.nruns; q++) differ &= strcmp(xa.runs[r].hash, xb.runs[q].hash) != 0;
        CHECK(differ, "identity: changing train.steps changes every run's hash");
        CHECK(xb.nruns == xa.nruns && !strcmp(xb.runs[0].name, xa.runs[0].name) && strcmp(xb.runs[0].id, xa.runs[0].id),
              "identity: same names, new ids");
        experiment_free(&xb);
    }
    if (parse_ok(&xc, "identity c", c, NOV)) {
        int kept = 0;
        for (int r = 0; r < xa.nruns; r++) {
            int q = find_run(&xc, xa.runs[r].name);
            kept += q >= 0 && !strcmp(xc.runs[q].hash, xa.runs[r].hash) && !strcmp(xc.runs[q].id, xa.runs[r].id);
        }
        CHECK(xc.nruns == (3 + 3 + 1) * 2 && kept == xa.nruns,
              "identity: a value added to an axis keeps every old run (%d of %d kept, %d runs now)", kept, xa.nruns,
              xc.nruns);
        int added = 0;
        for (int q = 0; q < xc.nruns; q++) {
            int old = 0;
            for (int r = 0; r < xa.nruns; r++) old |= !strcmp(xc.runs[q].id, xa.runs[r].id);
            added += !old && !strcmp(experiment_axis_value(&xc, q, 0), "3e-3");
        }
        CHECK(added == 4, "identity: the new runs are the new value's (x and y, 2 seeds): %d", added);
        experiment_free(&xc);
    }
    /* the hash is what a run computes: not its experiment, name or folder */
    if (parse_ok(&xd, "identity d", d, NOV)) {
        int same = xd.nruns == xa.nruns;
        for (int r = 0; same && r < xa.nruns; r++)
            same = !strcmp(xa.runs[r].hash, xd.runs[r].hash) && strcmp(xa.runs[r].id, xd.runs[r].id);
        CHECK(same, "identity: another experiment name (and nested keys) keeps hashes, changes ids");
        experiment_free(&xd);
    }
    ml_experiment xe;
    if (experiment_parse(&xe, a, strlen(a), "mem.yaml", 0, NULL, "elsewhere", &(ml_err){0}) == ML_OK) {
        int same = xe.nruns == xa.nruns;
        for (int r = 0; same && r < xa.nruns; r++)
            same = !strcmp(xa.runs[r].hash, xe.runs[r].hash) && !strcmp(xa.runs[r].id, xe.runs[r].id) &&
                   !strncmp(xe.runs[r].cfg.run.dir, "elsewhere/", 10);
        CHECK(same, "identity: another runs folder keeps hashes and ids");
        experiment_free(&xe);
    }
    experiment_free(&xa);

    /* text need not be NUL-terminated: an exact-size copy (ASan catches a read past its end) */
    const size_t len = strlen(a);
    char *exact = malloc(len);
    memcpy(exact, a, len);
    if (experiment_parse(&xe, exact, len, "mem.yaml", 0, NULL, "runs", &(ml_err){0}) == ML_OK) {
        CHECK(xe.nruns == 10, "identity: parse of a non-terminated buffer");
        experiment_free(&xe);
    } else {
        CHECK(0, "identity: parse of a non-terminated buffer failed");
    }
    free(exact);
    /* and len is respected: the text after len is not read */
    const char *cut = "base: {train.steps: 5}\nseeds: 3\nthis is not yaml: [";
    if (experiment_parse(&xe, cut, strlen("base: {train.steps: 5}\nseeds: 3\n"), "mem.yaml", 0, NULL, "runs",
                         &(ml_err){0}) == ML_OK) {
        CHECK(xe.nruns == 3, "identity: len bounds the text");
        experiment_free(&xe);
    } else {
        CHECK(0, "identity: the text after len was read");
    }
}

/* ---- the run database ---- */

static int first_value(void *ctx, int ncol, char **names, char **values) {
    (void)names;
    snprintf(ctx, 512, "%s", ncol > 0 && values[0] ? values[0] : "(null)");
    return 1;
}

static void query1(ml_rundb *db, const char *sql, char out[512]) {
    ml_err err = {0};
    snprintf(out, 512, "(no row)");
    if (rundb_query(db, sql, first_value, out, &err)) snprintf(out, 512, "(error %.400s)", err.msg);
}

static void add_all(ml_rundb *db, const ml_experiment *x, const char *what) {
    ml_err err = {0};
    CHECK(rundb_add_experiment(db, x->name, x->description, "mem.yaml", &err) == 0, "%s: add experiment: %s", what,
          err.msg);
    for (int r = 0; r < x->nruns; r++) {
        const ml_run_spec *s = &x->runs[r];
        int rc = rundb_add_run(db, s->id, x->name, s->name, &s->cfg, NULL, s->hash, s->cfg.run.dir, "cpu", 1, &err);
        CHECK(rc == 0, "%s: add run %s: %s", what, s->id, err.msg);
    }
}

static void test_rundb(void) {
    char dir[] = "/tmp/moelab_test_experiment_XXXXXX", path[128];
    if (!mkdtemp(dir)) {
        CHECK(0, "mkdtemp failed");
        return;
    }
    snprintf(path, sizeof path, "%s/runs.db", dir);
    ml_rundb *db = NULL;
    ml_err err = {0};
    if (rundb_open(&db, path, 0, &err)) {
        CHECK(0, "rundb_open %s: %s", path, err.msg);
        return;
    }
    const char *a = "name: lbl-coef\ndescription: LBL strength\n"
                    "base: {train.steps: 10, model.layer_top_k: [2, 1]}\n"
                    "sweep: {balance.aux_coef: [1e-3, 1e-2, 0.1]}\n"
                    "variants:\n  aux: {balance.policy: aux_loss}\n  lf: {cross: false, balance.policy: loss_free}\n"
                    "seeds: 2\n";
    ml_experiment x;
    if (parse_ok(&x, "rundb", a, NOV)) {
        add_all(db, &x, "rundb");
        char got[512], sql[2048];
        query1(db, "SELECT count(*) FROM runs WHERE experiment = 'lbl-coef'", got);
        CHECK(!strcmp(got, "8"), "rundb: 8 runs stored, got %s", got);
        query1(db, "SELECT description FROM experiments WHERE name = 'lbl-coef'", got);
        CHECK(!strcmp(got, "LBL strength"), "rundb: experiment description '%s'", got);
        const char *shortest[] = {"0.001", "0.01", "0.1"};
        for (int r = 0; r < x.nruns; r++) {
            const ml_run_spec *s = &x.runs[r];
            const char *v = experiment_axis_value(&x, r, 0);
            const char *want = !v ? "0.01" : !strcmp(v, "1e-3") ? shortest[0] : !strcmp(v, "1e-2") ? shortest[1] : shortest[2];
            snprintf(sql, sizeof sql, "SELECT value FROM params WHERE run = '%s' AND key = 'balance.aux_coef'", s->id);
            query1(db, sql, got);
            CHECK(!strcmp(got, want), "rundb: run %s params balance.aux_coef = '%s', want '%s'", s->name, got, want);
            snprintf(sql, sizeof sql, "SELECT value FROM params WHERE run = '%s' AND key = 'balance.policy'", s->id);
            query1(db, sql, got);
            CHECK(!strcmp(got, s->cfg.balance.policy), "rundb: run %s params balance.policy '%s'", s->name, got);
            snprintf(sql, sizeof sql,
                     "SELECT (SELECT value FROM params WHERE run = '%s' AND key = 'model.layer_top_k') || '|' || "
                     "(SELECT value FROM params WHERE run = '%s' AND key = 'seed') || '|' || "
                     "(SELECT value FROM params WHERE run = '%s' AND key = 'run.id') || '|' || "
                     "(SELECT config_hash FROM runs WHERE id = '%s') || '|' || "
                     "(SELECT run_dir FROM runs WHERE id = '%s') || '|' || (SELECT name FROM runs WHERE id = '%s')",
                     s->id, s->id, s->id, s->id, s->id, s->id);
            query1(db, sql, got);
            char want_row[1024];
            snprintf(want_row, sizeof want_row, "[2, 1]|%llu|%s|%s|runs/%s|%s", (unsigned long long)s->seed, s->id,
                     s->hash, s->id, s->name);
            CHECK(!strcmp(got, want_row), "rundb: run %s row '%s', want '%s'", s->name, got, want_row);
        }
        /* adding the same runs again changes nothing; a grown axis adds only its new runs */
        add_all(db, &x, "rundb again");
        query1(db, "SELECT count(*) FROM runs", got);
        CHECK(!strcmp(got, "8"), "rundb: re-adding the same runs is idempotent (%s runs)", got);
        experiment_free(&x);
        const char *grown = "name: lbl-coef\ndescription: LBL strength\n"
                            "base: {train.steps: 10, model.layer_top_k: [2, 1]}\n"
                            "sweep: {balance.aux_coef: [1e-3, 1e-2, 0.1, 0.3]}\n"
                            "variants:\n  aux: {balance.policy: aux_loss}\n  lf: {cross: false, balance.policy: loss_free}\n"
                            "seeds: 2\n";
        if (parse_ok(&x, "rundb grown", grown, NOV)) {
            add_all(db, &x, "rundb grown");
            query1(db, "SELECT count(*) FROM runs", got);
            CHECK(!strcmp(got, "10"), "rundb: a grown axis adds 2 runs (now %s)", got);
            query1(db, "SELECT group_concat(p.value) FROM params p JOIN runs r ON r.id = p.run "
                       "WHERE p.key = 'balance.aux_coef' AND r.name LIKE '%aux_coef=0.3%'",
                   got);
            CHECK(!strcmp(got, "0.3,0.3"), "rundb: new runs have aux_coef 0.3 ('%s')", got);
            experiment_free(&x);
        }
    }
    rundb_close(db);
    char f[160];
    const char *suffix[] = {"", "-wal", "-shm", "-journal"};
    for (int i = 0; i < 4; i++) snprintf(f, sizeof f, "%s%s", path, suffix[i]), remove(f);
    rmdir(dir);
}

/* ---- errors of in-memory text (the file suite below has one per mistake) ---- */

static void test_errors(void) {
    parse_bad("empty text", "", NOV, "mem.yaml:1: the file is empty");
    parse_bad("duplicate nested/dotted", "base:\n  model.top_k: 1\n  model: {top_k: 2}\n", NOV,
              "mem.yaml:3: model.top_k: given twice (first on line 2)");
    parse_bad("too many runs", "sweep:\n  train.steps: [1, 2, 3]\n  train.warmup: [1, 2, 3]\nseeds: 1112\n", NOV,
              "mem.yaml:2: the experiment expands to more than 10000 runs");
    parse_bad("preset axis value", "sweep: {preset: [tiny, huge]}\n", NOV, "mem.yaml:1: preset: unknown preset 'huge'");
    parse_bad("NUL in value", "base: {data.dir: \"a\\0b\"}\n", NOV, "data.dir: contains a NUL byte");
    parse_bad("seed swept with seeds", "sweep: {seed: [1, 2]}\nseeds: 2\n", NOV,
              "mem.yaml:1: seed: swept and given by seeds: on line 2");
    parse_bad("cross twice wrong", "variants: {a: {cross: [1]}}\n", NOV, "variants: a: cross: expected true or false");
    parse_bad("name not a scalar", "name: [a]\n", NOV, "mem.yaml:1: name: expected a single value, not a list");
    parse_bad("seeds mapping", "seeds: {a: 1}\n", NOV, "mem.yaml:1: seeds: expected a list of seeds or a count");
    parse_bad("base a list", "base: [train.steps, 1]\n", NOV, "mem.yaml:1: base: expected a mapping of keys, not a list");
    parse_bad("too deep", "base: {a: {b: {c: {d: {e: {f: {g: {h: {i: {j: {k: {l: {m: {n: {o: {p: {q: 1}}}}}}}}}}}}}}}}}\n",
              NOV, "nested more than 16 levels deep");
    ml_experiment x;
    ml_err err = {0};
    CHECK(experiment_load(&x, "/nonexistent/exp.yaml", 0, NULL, "runs", &err) == ML_EINPUT &&
              strstr(err.msg, "/nonexistent/exp.yaml: "),
          "load: a missing file names the path ('%s')", err.msg);
}

/* ---- the files ---- */

static int list_yaml(const char *dir, char names[][256], int cap) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) && n < cap;) {
        size_t len = strlen(e->d_name);
        if (len > 5 && len < 200 && !strcmp(e->d_name + len - 5, ".yaml")) snprintf(names[n++], 256, "%s", e->d_name);
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof names[0], (int (*)(const void *, const void *))strcmp);
    return n;
}

static void test_good_files(void) {
    static char names[256][256];
    int n = list_yaml("good", names, 256);
    CHECK(n >= 3, "good/: expected at least 3 example files, found %d", n);
    for (int i = 0; i < n; i++) {
        char path[512];
        snprintf(path, sizeof path, "good/%.250s", names[i]);
        ml_experiment x;
        ml_err err = {0};
        int rc = experiment_load(&x, path, 0, NULL, "runs", &err);
        CHECK(rc == ML_OK && x.nruns >= 1, "%s: expected to load, got %d '%s'", path, rc, err.msg);
        if (rc) continue;
        check_runs(&x, "runs", path);
        if (!strcmp(names[i], "all-features.yaml"))
            CHECK(x.nruns == (6 + 6 + 1 + 1) * 2 && x.naxes == 2 && x.nvariants == 4 && x.nseeds == 2 &&
                      x.description && strstr(x.description, "progressive top-k"),
                  "%s: (6 + 6 + 1 + 1) x 2 = 28 runs, got %d", path, x.nruns);
        experiment_free(&x);
    }
}

static void test_bad_files(void) {
    static char names[512][256];
    int n = list_yaml("bad", names, 512), checked = 0;
    CHECK(n >= 12, "bad/: expected at least 12 malformed files, found %d", n);
    for (int i = 0; i < n; i++) {
        char path[512], first[512] = "";
        snprintf(path, sizeof path, "bad/%.250s", names[i]);
        FILE *f = fopen(path, "r");
        if (!f || !fgets(first, sizeof first, f)) {
            CHECK(0, "%s: cannot read its first line", path);
            if (f) fclose(f);
            continue;
        }
        fclose(f);
        first[strcspn(first, "\r\n")] = 0;
        int line = 0, off = 0;
        if (sscanf(first, "# expect: %d: %n", &line, &off) != 1 || off == 0 || line < 1 || !first[off]) {
            CHECK(0, "%s: first line must be '# expect: <line>: <substring>', is '%s'", path, first);
            continue;
        }
        const char *want = first + off;
        char prefix[600];
        snprintf(prefix, sizeof prefix, "%s:%d: ", path, line);
        ml_experiment x;
        ml_err err = {0};
        int rc = experiment_load(&x, path, 0, NULL, "runs", &err);
        CHECK(rc == ML_EINPUT && err.code == ML_EINPUT, "%s: expected ML_EINPUT, got %d ('%s')", path, rc, err.msg);
        CHECK(!strncmp(err.msg, prefix, strlen(prefix)), "%s: message should start '%s', is '%s'", path, prefix,
              err.msg);
        CHECK(strstr(err.msg, want) != NULL, "%s: message should contain '%s', is '%s'", path, want, err.msg);
        CHECK(x.nruns == 0 && !x.runs && !x.variants && !x.axes && !x.seeds && !x.base.items && !x.description,
              "%s: nothing left allocated", path);
        if (rc == ML_OK) experiment_free(&x);
        checked++;
    }
    printf("experiment: %d malformed files checked\n", checked);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "tests/experiments";
    test_grid();
    test_variants();
    test_empty_variants();
    test_seeds();
    test_nested_and_lists();
    test_precedence();
    test_names();
    test_identity();
    test_rundb();
    test_errors();
    /* the files are named relative to dir, so messages hold short, predictable paths */
    if (chdir(dir)) {
        CHECK(0, "cannot enter %s", dir);
    } else {
        test_good_files();
        test_bad_files();
    }
    printf("experiment: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
