/*
 * qm_event: CloudEvents metadata for new events and W3C traceparent helpers.
 */
#include "qm_event.h"

#include "qm_common.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>

static bool qm_is_lower_hex(const char *s, size_t n) {
  bool nonzero = false;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    if (c != '0') nonzero = true;
  }
  return nonzero;
}

bool qm_traceparent_valid(const char *tp) {
  if (!tp || strlen(tp) != 55) return false;
  if (tp[0] != '0' || tp[1] != '0' || tp[2] != '-' || tp[35] != '-' || tp[52] != '-') return false;
  return qm_is_lower_hex(tp + 3, 32) && qm_is_lower_hex(tp + 36, 16) &&
         (tp[53] >= '0' && tp[53] <= 'f') && (tp[54] >= '0' && tp[54] <= 'f');
}

static void qm_random_hex(char *out, size_t nbytes) {
  unsigned char buf[16];
  do {
    if (RAND_bytes(buf, (int)nbytes) != 1) {
      for (size_t i = 0; i < nbytes; i++) buf[i] = (unsigned char)(qm_mono_us() >> (i % 8));
    }
    for (size_t i = 0; i < nbytes; i++) snprintf(out + 2 * i, 3, "%02x", buf[i]);
  } while (!qm_is_lower_hex(out, nbytes * 2));
}

void qm_traceparent_child(const char *parent, char *out, size_t out_size) {
  char trace[33], span[17];
  const char *flags = "01";
  if (qm_traceparent_valid(parent)) {
    memcpy(trace, parent + 3, 32);
    trace[32] = '\0';
  } else {
    qm_random_hex(trace, 16);
  }
  qm_random_hex(span, 8);
  char flagbuf[3] = "01";
  if (qm_traceparent_valid(parent)) {
    memcpy(flagbuf, parent + 53, 2);
    flags = flagbuf;
  }
  snprintf(out, out_size, "00-%s-%s-%s", trace, span, flags);
}

void qm_traceparent_trace_id(const char *tp, char *out, size_t out_size) {
  if (!qm_traceparent_valid(tp)) {
    if (out_size) out[0] = '\0';
    return;
  }
  snprintf(out, out_size, "%.32s", tp + 3);
}

void qm_event_meta_init(qm_event_meta_t *meta, const char *service, const char *type,
                        const char *subject, const char *parent_traceparent) {
  memset(meta, 0, sizeof(*meta));
  qm_uuid_new(meta->id);
  snprintf(meta->source, sizeof(meta->source), "/qm/%s", service);
  qm_strlcpy(meta->type, type, sizeof(meta->type));
  qm_strlcpy(meta->subject, subject ? subject : "", sizeof(meta->subject));
  meta->time_ms = qm_now_ms();
  qm_strlcpy(meta->content_type, QM_CONTENT_TYPE_PROTOBUF, sizeof(meta->content_type));
  qm_traceparent_child(parent_traceparent, meta->traceparent, sizeof(meta->traceparent));
}

bool qm_event_header(const qm_event_in_t *ev, const char *name, char *out, size_t out_size) {
  for (size_t i = 0; i < ev->n_headers; i++) {
    if (strcmp(ev->headers[i].name, name) != 0) continue;
    if (out_size > 0) {
      size_t n = ev->headers[i].value_len < out_size - 1 ? ev->headers[i].value_len : out_size - 1;
      if (n) memcpy(out, ev->headers[i].value, n);
      out[n] = '\0';
    }
    return true;
  }
  return false;
}

bool qm_event_topic_is_dlq(const char *topic) {
  size_t n = strlen(topic), s = strlen(".dlq");
  return n > s && strcmp(topic + n - s, ".dlq") == 0;
}
