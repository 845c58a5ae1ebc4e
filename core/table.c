/* table.c: text / CSV / JSON output of small result tables. */
#include "table.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

int table_format_parse(const char *s) {
    if (!strcmp(s, "table")) return TABLE_TEXT;
    if (!strcmp(s, "csv")) return TABLE_CSV;
    if (!strcmp(s, "json")) return TABLE_JSON;
    return -1;
}

void table_init(ml_table *t, int ncol, const char *const *names) {
    memset(t, 0, sizeof *t);
    t->ncol = ncol;
    t->names = calloc(ncol, sizeof(char *));
    for (int c = 0; c < ncol; c++) t->names[c] = strdup(names[c]);
}

void table_add(ml_table *t, const char *const *cells) {
    if (t->nrow == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 16;
        t->cells = realloc(t->cells, sizeof(char *) * (size_t)t->cap * t->ncol);
    }
    for (int c = 0; c < t->ncol; c++) t->cells[(size_t)t->nrow * t->ncol + c] = cells[c] ? strdup(cells[c]) : NULL;
    t->nrow++;
}

void table_addf(ml_table *t, const char *fmt, ...) {
    char *line = NULL;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&line, fmt, ap) < 0) line = NULL;
    va_end(ap);
    if (!line) return;
    const char **cells = calloc(t->ncol, sizeof(char *));
    char *p = line;
    for (int c = 0; c < t->ncol; c++) {
        cells[c] = p;
        char *tab = p ? strchr(p, '\t') : NULL;
        if (tab) *tab = 0, p = tab + 1;
        else p = NULL;
        if (!cells[c]) cells[c] = "";
    }
    table_add(t, cells);
    free(cells);
    free(line);
}

static int is_number(const char *s) {
    if (!s || !*s) return 0;
    char *end;
    strtod(s, &end);
    return *end == 0 && strcmp(s, "nan") && strcmp(s, "inf") && strcmp(s, "-inf");
}

static void csv_cell(const char *s, FILE *f) {
    if (!s) return;
    if (!strpbrk(s, ",\"\n\r")) {
        fputs(s, f);
        return;
    }
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"') fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

static void json_string(const char *s, FILE *f) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch == '\n') fputs("\\n", f);
        else if (ch == '\t') fputs("\\t", f);
        else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

void table_print(const ml_table *t, int format, FILE *f) {
    if (format == TABLE_CSV) {
        for (int c = 0; c < t->ncol; c++) fputs(c ? "," : "", f), csv_cell(t->names[c], f);
        fputc('\n', f);
        for (int r = 0; r < t->nrow; r++) {
            for (int c = 0; c < t->ncol; c++) fputs(c ? "," : "", f), csv_cell(t->cells[(size_t)r * t->ncol + c], f);
            fputc('\n', f);
        }
        return;
    }
    if (format == TABLE_JSON) {
        fputs("[", f);
        for (int r = 0; r < t->nrow; r++) {
            fputs(r ? ",\n {" : "\n {", f);
            for (int c = 0; c < t->ncol; c++) {
                const char *v = t->cells[(size_t)r * t->ncol + c];
                fputs(c ? ", " : "", f);
                json_string(t->names[c], f);
                fputs(": ", f);
                if (!v) fputs("null", f);
                else if (is_number(v)) fputs(v, f);
                else json_string(v, f);
            }
            fputs("}", f);
        }
        fputs(t->nrow ? "\n]\n" : "]\n", f);
        return;
    }
    int *w = calloc(t->ncol, sizeof(int));
    for (int c = 0; c < t->ncol; c++) {
        w[c] = (int)strlen(t->names[c]);
        for (int r = 0; r < t->nrow; r++) {
            const char *v = t->cells[(size_t)r * t->ncol + c];
            int n = v ? (int)strlen(v) : 4;
            w[c] = n > w[c] ? n : w[c];
        }
        if (w[c] > 60) w[c] = 60;
    }
    for (int c = 0; c < t->ncol; c++) fprintf(f, "%s%-*s", c ? "  " : "", w[c], t->names[c]);
    fputc('\n', f);
    for (int c = 0; c < t->ncol; c++) {
        fputs(c ? "  " : "", f);
        for (int i = 0; i < w[c]; i++) fputc('-', f);
    }
    fputc('\n', f);
    for (int r = 0; r < t->nrow; r++) {
        for (int c = 0; c < t->ncol; c++) {
            const char *v = t->cells[(size_t)r * t->ncol + c];
            fprintf(f, "%s%-*.*s", c ? "  " : "", w[c], w[c], v ? v : "NULL");
        }
        fputc('\n', f);
    }
    free(w);
}

void table_free(ml_table *t) {
    for (int c = 0; c < t->ncol; c++) free(t->names[c]);
    for (size_t i = 0; i < (size_t)t->nrow * t->ncol; i++) free(t->cells[i]);
    free(t->names);
    free(t->cells);
    memset(t, 0, sizeof *t);
}
