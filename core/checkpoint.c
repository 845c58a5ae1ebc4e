/* checkpoint.c: binary checkpoints: "MOELABCK", version, the resolved config as text, the train state, then
 * params, AdamW m and v, router biases, and an FNV-1a hash of everything before it. */
#include "checkpoint.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char MAGIC[8] = {'M', 'O', 'E', 'L', 'A', 'B', 'C', 'K'};

typedef struct {
    FILE *f;
    uint64_t hash;
    int failed;
} hfile;

static void hash_bytes(uint64_t *h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) *h = (*h ^ b[i]) * 0x100000001b3ULL;
}

static void put(hfile *w, const void *p, size_t n) {
    if (fwrite(p, 1, n, w->f) != n) w->failed = 1;
    hash_bytes(&w->hash, p, n);
}

static int get(hfile *r, void *p, size_t n) {
    if (fread(p, 1, n, r->f) != n) return r->failed = 1, -1;
    hash_bytes(&r->hash, p, n);
    return 0;
}

/* the model.* lines of the resolved config: what must match for the weights to fit */
static char *model_config_text(const ml_config *c) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    config_write(c, f);
    fclose(f);
    char *out = calloc(len + 1, 1), *o = out;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
        if (!strncmp(line, "model.", 6)) o += sprintf(o, "%s\n", line);
    free(buf);
    return out;
}

static void put_arena(hfile *w, const ml_model *m, const float *arena, size_t n) {
    float *host = malloc(sizeof(float) * n);
    m->be->to_host(host, arena, sizeof(float) * n);
    put(w, host, sizeof(float) * n);
    free(host);
}

int checkpoint_save(const char *path, const ml_model *m, const ml_train_state *st, ml_err *err) {
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    hfile w = {fopen(tmp, "wb"), 0xcbf29ce484222325ULL, 0};
    if (!w.f) return ml_errf(err, ML_ERUN, "%s: cannot write checkpoint: %s", tmp, strerror(errno));
    uint32_t version = ML_CHECKPOINT_VERSION;
    char *cfg = model_config_text(&m->cfg);
    uint64_t cfg_len = strlen(cfg), n = m->nparams, nbias = (uint64_t)m->L * (m->E ? m->E : 1);
    put(&w, MAGIC, sizeof MAGIC);
    put(&w, &version, sizeof version);
    put(&w, &cfg_len, sizeof cfg_len);
    put(&w, cfg, cfg_len);
    put(&w, st, sizeof *st);
    put(&w, &n, sizeof n);
    put_arena(&w, m, m->params, n);
    put_arena(&w, m, m->adam_m, n);
    put_arena(&w, m, m->adam_v, n);
    put(&w, &nbias, sizeof nbias);
    put_arena(&w, m, m->router_bias, nbias);
    uint64_t h = w.hash;
    put(&w, &h, sizeof h);
    free(cfg);
    if (fflush(w.f) || fsync(fileno(w.f))) w.failed = 1;
    if (fclose(w.f)) w.failed = 1;
    if (w.failed || rename(tmp, path)) {
        remove(tmp);
        return ml_errf(err, ML_ERUN, "%s: writing the checkpoint failed: %s", path, strerror(errno));
    }
    return ML_OK;
}

static int get_arena(hfile *r, const ml_model *m, float *arena, size_t n) {
    float *host = malloc(sizeof(float) * n);
    int rc = get(r, host, sizeof(float) * n);
    if (!rc) m->be->from_host(arena, host, sizeof(float) * n);
    free(host);
    return rc;
}

int checkpoint_load(const char *path, ml_model *m, ml_train_state *st, ml_err *err) {
    hfile r = {fopen(path, "rb"), 0xcbf29ce484222325ULL, 0};
    if (!r.f) return ml_errf(err, ML_EINPUT, "%s: cannot open checkpoint: %s", path, strerror(errno));
    char magic[8];
    uint32_t version = 0;
    uint64_t cfg_len = 0, n = 0, nbias = 0, h_expect, h_file;
    char *cfg = NULL, *mine = model_config_text(&m->cfg);
    int rc = ML_OK;
    if (get(&r, magic, sizeof magic) || memcmp(magic, MAGIC, sizeof magic)) {
        rc = ml_errf(err, ML_EINPUT, "%s: not a moelab checkpoint (bad magic)", path);
        goto out;
    }
    if (get(&r, &version, sizeof version) || version != ML_CHECKPOINT_VERSION) {
        rc = ml_errf(err, ML_EINPUT, "%s: checkpoint version %u, this build reads %d", path, version,
                     ML_CHECKPOINT_VERSION);
        goto out;
    }
    if (get(&r, &cfg_len, sizeof cfg_len) || cfg_len > (1u << 20) || !(cfg = calloc(cfg_len + 1, 1)) ||
        get(&r, cfg, cfg_len)) {
        rc = ml_errf(err, ML_EINPUT, "%s: truncated checkpoint (config)", path);
        goto out;
    }
    if (strcmp(cfg, mine)) {
        /* name the first differing key */
        char *a = cfg, *b = mine;
        while (*a && *a == *b) {
            char *ea = strchr(a, '\n'), *eb = strchr(b, '\n');
            if (!ea || !eb || ea - a != eb - b || strncmp(a, b, ea - a)) break;
            a = ea + 1, b = eb + 1;
        }
        char *ea = strchr(a, '\n'), *eb = strchr(b, '\n');
        rc = ml_errf(err, ML_EINPUT, "%s: checkpoint model differs: checkpoint has '%.*s', config has '%.*s'", path,
                     ea ? (int)(ea - a) : (int)strlen(a), a, eb ? (int)(eb - b) : (int)strlen(b), b);
        goto out;
    }
    if (get(&r, st, sizeof *st) || get(&r, &n, sizeof n) || n != m->nparams) {
        rc = ml_errf(err, ML_EINPUT, "%s: truncated checkpoint or parameter count mismatch", path);
        goto out;
    }
    if (get_arena(&r, m, m->params, n) || get_arena(&r, m, m->adam_m, n) || get_arena(&r, m, m->adam_v, n) ||
        get(&r, &nbias, sizeof nbias) || nbias != (uint64_t)m->L * (m->E ? m->E : 1) ||
        get_arena(&r, m, m->router_bias, nbias)) {
        rc = ml_errf(err, ML_EINPUT, "%s: truncated checkpoint", path);
        goto out;
    }
    h_expect = r.hash;
    if (fread(&h_file, 1, sizeof h_file, r.f) != sizeof h_file || h_file != h_expect) {
        rc = ml_errf(err, ML_EINPUT, "%s: checkpoint is corrupt (checksum mismatch)", path);
        goto out;
    }
out:
    free(cfg);
    free(mine);
    fclose(r.f);
    return rc;
}
