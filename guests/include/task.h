/*
 * task.h - tiny helpers for wasmbox guest programs.
 *
 * Sandbox conventions: /task (read-only) holds input.json; /task/output
 * (writable) receives result.json and any other output files.
 *
 * Header-only; every function is static so each guest is one translation unit.
 */
#ifndef WASMBOX_TASK_H
#define WASMBOX_TASK_H

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TASK_INPUT_PATH "/task/input.json"
#define TASK_RESULT_PATH "/task/output/result.json"

/* Read a whole file into a NUL-terminated heap buffer. Returns NULL on error. */
static inline char *task_read_file(const char *path, size_t *len_out) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (!buf) { fclose(f); return NULL; }
    for (;;) {
        if (len + 1 >= cap) {
            cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) { free(buf); fclose(f); return NULL; }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len - 1, f);
        if (n == 0) break;
        len += n;
    }
    int err = ferror(f);
    fclose(f);
    if (err) { free(buf); return NULL; }
    buf[len] = '\0';
    if (len_out) *len_out = len;
    return buf;
}

/* Read /task/input.json. Returns NULL (and prints a diagnostic) if missing. */
static inline char *task_read_input(void) {
    char *s = task_read_file(TASK_INPUT_PATH, NULL);
    if (!s) perror("task: cannot read " TASK_INPUT_PATH);
    return s;
}

/* Write a JSON document (already serialised) to /task/output/result.json. */
static inline int task_write_result(const char *json) {
    FILE *f = fopen(TASK_RESULT_PATH, "wb");
    if (!f) { perror("task: cannot write " TASK_RESULT_PATH); return -1; }
    size_t n = strlen(json);
    int ok = fwrite(json, 1, n, f) == n;
    ok = (fclose(f) == 0) && ok;
    if (!ok) { perror("task: short write " TASK_RESULT_PATH); return -1; }
    return 0;
}

static inline const char *task_skip_ws(const char *p) {
    while (*p && isspace((unsigned char)*p)) p++;
    return p;
}

/*
 * Find the value of top-level-ish key `key` in a JSON object: returns a
 * pointer to the first non-space character after `"key":`, or NULL.
 * This is a deliberately small scanner: it skips over string literals so a
 * key name appearing inside a string value is not matched, but it does not
 * track nesting depth.
 */
static inline const char *task_json_find(const char *json, const char *key) {
    size_t klen = strlen(key);
    const char *p = json;
    while (*p) {
        if (*p == '"') {
            const char *start = ++p;
            while (*p && *p != '"') {
                if (*p == '\\' && p[1]) p++;
                p++;
            }
            if (!*p) return NULL;
            size_t slen = (size_t)(p - start);
            p++; /* closing quote */
            if (slen == klen && memcmp(start, key, klen) == 0) {
                const char *q = task_skip_ws(p);
                if (*q == ':') return task_skip_ws(q + 1);
            }
        } else {
            p++;
        }
    }
    return NULL;
}

/* Parse an integer value for `key`. Returns 1 and sets *out on success. */
static inline int task_json_int(const char *json, const char *key, long long *out) {
    const char *p = task_json_find(json, key);
    if (!p) return 0;
    char *end;
    long long v = strtoll(p, &end, 10);
    if (end == p) return 0;
    *out = v;
    return 1;
}

static inline int task_hex(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static inline size_t task_utf8_put(char *o, unsigned long cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/*
 * Decode the JSON string value for `key` into a fresh heap buffer (UTF-8,
 * NUL-terminated; embedded NULs from \u0000 are kept and counted in *len_out).
 * Handles \" \\ \/ \b \f \n \r \t and \uXXXX (with surrogate pairs).
 * Returns NULL if the key is missing or the value is not a valid string.
 */
static inline char *task_json_string(const char *json, const char *key, size_t *len_out) {
    const char *p = task_json_find(json, key);
    if (!p || *p != '"') return NULL;
    p++;
    size_t cap = strlen(p) + 1; /* decoded is never longer than encoded */
    char *out = malloc(cap);
    if (!out) return NULL;
    size_t n = 0;
    for (;;) {
        char c = *p++;
        if (c == '\0') { free(out); return NULL; }
        if (c == '"') break;
        if (c != '\\') { out[n++] = c; continue; }
        char e = *p++;
        switch (e) {
        case '"': out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; break;
        case '/': out[n++] = '/'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            unsigned long cp = 0;
            for (int i = 0; i < 4; i++) {
                int h = task_hex(*p);
                if (h < 0) { free(out); return NULL; }
                cp = cp * 16 + (unsigned long)h;
                p++;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF && p[0] == '\\' && p[1] == 'u') {
                unsigned long lo = 0;
                int ok = 1;
                for (int i = 0; i < 4; i++) {
                    int h = task_hex(p[2 + i]);
                    if (h < 0) { ok = 0; break; }
                    lo = lo * 16 + (unsigned long)h;
                }
                if (ok && lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    p += 6;
                }
            }
            if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD; /* lone surrogate */
            n += task_utf8_put(out + n, cp);
            break;
        }
        default: free(out); return NULL;
        }
    }
    out[n] = '\0';
    if (len_out) *len_out = n;
    return out;
}

#endif /* WASMBOX_TASK_H */
