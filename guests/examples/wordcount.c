/*
 * wordcount: reads {"text":"..."} and writes {"words":N,"lines":N,"chars":N}.
 *   words = maximal runs of non-whitespace (ASCII space, \t \n \v \f \r),
 *           i.e. len(text.split()) for ASCII whitespace;
 *   lines = number of '\n' characters, plus one if the text is non-empty and
 *           does not end in '\n' ("" -> 0, "a" -> 1, "a\n" -> 1, "a\nb" -> 2);
 *   chars = number of Unicode code points (Python len(text)).
 * JSON escapes (\n, \t, \", \\, \uXXXX incl. surrogate pairs) are decoded.
 * Exit 2 if the input is missing or "text" is not a string.
 */
#include <stdio.h>
#include <stdlib.h>

#include "task.h"

static int is_ws(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

int main(void) {
    char *in = task_read_input();
    if (!in) return 2;
    size_t len = 0;
    char *text = task_json_string(in, "text", &len);
    if (!text) {
        fprintf(stderr, "wordcount: input has no \"text\" string\n");
        return 2;
    }
    long long words = 0, lines = 0, chars = 0;
    int in_word = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if ((c & 0xC0) != 0x80) chars++; /* count UTF-8 lead bytes */
        if (c == '\n') lines++;
        if (is_ws(c)) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            words++;
        }
    }
    if (len > 0 && text[len - 1] != '\n') lines++;
    char out[128];
    snprintf(out, sizeof out, "{\"words\":%lld,\"lines\":%lld,\"chars\":%lld}", words, lines,
             chars);
    free(text);
    free(in);
    return task_write_result(out) == 0 ? 0 : 1;
}
