/* table.h: rows of text cells printed as an aligned table, CSV (RFC 4180 quoting) or JSON (an array of
 * objects keyed by column name; cells that parse as numbers are emitted as numbers, NULL as null). Used by
 * every listing command's --format. */
#ifndef MOELAB_TABLE_H
#define MOELAB_TABLE_H

#include <stdio.h>

enum ml_table_format { TABLE_TEXT = 0, TABLE_CSV = 1, TABLE_JSON = 2 };

typedef struct {
    int ncol, nrow, cap;
    char **names;  /* ncol */
    char **cells;  /* nrow * ncol, NULL = SQL NULL */
} ml_table;

/* Parses "table" | "csv" | "json"; returns -1 for anything else. */
int table_format_parse(const char *s);

void table_init(ml_table *t, int ncol, const char *const *names);
/* Appends a row of ncol cells (copied; NULL allowed). */
void table_add(ml_table *t, const char *const *cells);
/* Appends a row from printf-style formatted cells: fmt has one conversion per column separated by '\t'. */
void table_addf(ml_table *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void table_print(const ml_table *t, int format, FILE *f);
void table_free(ml_table *t);

#endif
