/* check.h: the one assertion macro of the C tests. CHECK counts a pass, or prints the file, line and a
 * formatted reason and counts a failure; a test's main prints "NAME: P passed, F failed" and exits 1 on any
 * failure. */
#ifndef MOELAB_TEST_CHECK_H
#define MOELAB_TEST_CHECK_H

#include <stdio.h>

static int passed __attribute__((unused)), failed __attribute__((unused)); /* unused where a test body is compiled out */

#define CHECK(cond, ...)                                                                                       \
    do {                                                                                                       \
        if (cond) passed++;                                                                                    \
        else {                                                                                                 \
            failed++;                                                                                          \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                        \
            printf(__VA_ARGS__);                                                                               \
            printf("\n");                                                                                      \
        }                                                                                                      \
    } while (0)

#endif
