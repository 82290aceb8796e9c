/*
 * sqlite_work: a fixed, call-heavy SQLite workload on an in-memory
 * database, linked with an amalgamation built with or without
 * -fpatchable-function-entry=8,6.
 *
 *   sqlite_work ROWS
 *
 * Inserts ROWS rows (one transaction, one prepared statement), then
 * ROWS point queries by primary key, ROWS/10 range queries on an
 * indexed column, and one GROUP BY over the table. Prints
 * "ns T checksum C"; T covers the workload, not the process start.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "sqlite3.h"

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000 + t.tv_nsec;
}

#define CHECK(x)                                                              \
    do {                                                                      \
        if ((x) != SQLITE_OK) {                                               \
            fprintf(stderr, "%s: %s\n", #x, sqlite3_errmsg(db));              \
            return 1;                                                         \
        }                                                                     \
    } while (0)

int main(int argc, char **argv)
{
    long rows = argc > 1 ? atol(argv[1]) : 10000;
    if (rows < 10)
        return 2;
    sqlite3 *db;
    if (sqlite3_open(":memory:", &db) != SQLITE_OK)
        return 1;
    long long t0 = now_ns();
    unsigned long long checksum = 0;
    CHECK(sqlite3_exec(db, "CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);"
                           "CREATE INDEX tk ON t(k);", 0, 0, 0));
    CHECK(sqlite3_exec(db, "BEGIN", 0, 0, 0));
    sqlite3_stmt *ins, *get, *range, *group;
    CHECK(sqlite3_prepare_v2(db, "INSERT INTO t(id, k, v) VALUES(?, ?, ?)", -1, &ins, 0));
    char text[64];
    for (long i = 0; i < rows; i++) {
        snprintf(text, sizeof text, "row-%ld-%ld", i, (i * 7919) % 1000);
        sqlite3_bind_int64(ins, 1, i);
        sqlite3_bind_int64(ins, 2, (i * 7919) % rows);
        sqlite3_bind_text(ins, 3, text, -1, SQLITE_TRANSIENT);
        if (sqlite3_step(ins) != SQLITE_DONE)
            return 1;
        sqlite3_reset(ins);
    }
    CHECK(sqlite3_exec(db, "COMMIT", 0, 0, 0));
    CHECK(sqlite3_prepare_v2(db, "SELECT k, length(v) FROM t WHERE id = ?", -1, &get, 0));
    for (long i = 0; i < rows; i++) {
        sqlite3_bind_int64(get, 1, (i * 104729) % rows);
        while (sqlite3_step(get) == SQLITE_ROW)
            checksum += (unsigned long long)sqlite3_column_int64(get, 0) + (unsigned long long)sqlite3_column_int(get, 1);
        sqlite3_reset(get);
    }
    CHECK(sqlite3_prepare_v2(db, "SELECT count(*), sum(length(v)) FROM t WHERE k BETWEEN ? AND ?", -1, &range, 0));
    for (long i = 0; i < rows / 10; i++) {
        long lo = (i * 31) % rows;
        sqlite3_bind_int64(range, 1, lo);
        sqlite3_bind_int64(range, 2, lo + 50);
        while (sqlite3_step(range) == SQLITE_ROW)
            checksum += (unsigned long long)sqlite3_column_int64(range, 0) * 3 + (unsigned long long)sqlite3_column_int64(range, 1);
        sqlite3_reset(range);
    }
    CHECK(sqlite3_prepare_v2(db, "SELECT k % 97, count(*), max(v) FROM t GROUP BY 1 ORDER BY 2 DESC", -1, &group, 0));
    while (sqlite3_step(group) == SQLITE_ROW)
        checksum += (unsigned long long)sqlite3_column_int64(group, 1);
    sqlite3_finalize(ins);
    sqlite3_finalize(get);
    sqlite3_finalize(range);
    sqlite3_finalize(group);
    long long t1 = now_ns();
    sqlite3_close(db);
    printf("ns %lld checksum %llu\n", t1 - t0, checksum);
    return 0;
}
