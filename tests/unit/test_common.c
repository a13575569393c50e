/* Unit tests for qm_common, qm_log and qm_event. */
#include <criterion/criterion.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "qm_common.h"
#include "qm_event.h"
#include "qm_log.h"

Test(common, strlcpy_truncates_and_terminates) {
  char buf[5];
  cr_assert_eq(qm_strlcpy(buf, "abcdefgh", sizeof(buf)), 8);
  cr_assert_str_eq(buf, "abcd");
  cr_assert_eq(qm_strlcpy(buf, "ab", sizeof(buf)), 2);
  cr_assert_str_eq(buf, "ab");
}

Test(common, rfc3339_round_trip) {
  char s[40];
  qm_time_format_rfc3339(1795919400123LL, s, sizeof(s));
  cr_assert_str_eq(s, "2026-11-29T02:30:00.123Z");
  int64_t ms = 0;
  cr_assert_eq(qm_time_parse_rfc3339(s, &ms), QM_OK);
  cr_assert_eq(ms, 1795919400123LL);
  cr_assert_eq(qm_time_parse_rfc3339("2026-11-29T03:30:00+01:00", &ms), QM_OK);
  cr_assert_eq(ms, 1795919400000LL);
  cr_assert_eq(qm_time_parse_rfc3339("2026-11-29 01:10:00", &ms), QM_EINVAL);
  cr_assert_eq(qm_time_parse_rfc3339("2026-11-29T01:10:00.Z", &ms), QM_EINVAL);
  cr_assert_eq(qm_time_parse_rfc3339("2026-11-29T01:10:00Zjunk", &ms), QM_EINVAL);
}

Test(common, uuids_are_valid_and_distinct) {
  char a[QM_UUID_STR_LEN], b[QM_UUID_STR_LEN];
  qm_uuid_new(a);
  qm_uuid_new(b);
  cr_assert(qm_uuid_valid(a));
  cr_assert_str_neq(a, b);
  cr_assert_eq(a[14], '4', "version 4: %s", a);
  cr_assert_not(qm_uuid_valid("not-a-uuid"));
  cr_assert_not(qm_uuid_valid(NULL));
}

Test(common, err_formats_and_returns_code) {
  char e[32];
  cr_assert_eq(qm_err(e, sizeof(e), QM_EINVAL, "bad %s", "field"), QM_EINVAL);
  cr_assert_str_eq(e, "bad field");
  cr_assert_str_eq(qm_strerror(QM_EDUP), "QM_EDUP");
}

Test(log, lines_are_json_with_ids) {
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  qm_log_init("intake", QM_LOG_INFO, f);
  qm_log(QM_LOG_INFO, "req-1", "trace-1", "granted \"%s\"", "figma");
  qm_log_debug("not shown");
  fflush(f);
  json_error_t jerr;
  json_t *o = json_loads(buf, JSON_DISABLE_EOF_CHECK, &jerr);
  cr_assert_not_null(o, "not JSON: %s", buf);
  cr_assert_str_eq(json_string_value(json_object_get(o, "service")), "intake");
  cr_assert_str_eq(json_string_value(json_object_get(o, "level")), "info");
  cr_assert_str_eq(json_string_value(json_object_get(o, "msg")), "granted \"figma\"");
  cr_assert_str_eq(json_string_value(json_object_get(o, "request_id")), "req-1");
  cr_assert_str_eq(json_string_value(json_object_get(o, "trace_id")), "trace-1");
  cr_assert_not_null(json_object_get(o, "time"));
  cr_assert_null(strstr(buf, "not shown"));
  json_decref(o);
  fclose(f);
  free(buf);
  qm_log_init("test", QM_LOG_INFO, NULL);
}

Test(log, invalid_utf8_does_not_lose_the_line) {
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  qm_log_init("intake", QM_LOG_INFO, f);
  qm_log_info("bytes \xff\xfe here");
  fflush(f);
  cr_assert(strstr(buf, "bytes ?? here"), "%s", buf);
  fclose(f);
  free(buf);
  qm_log_init("test", QM_LOG_INFO, NULL);
}

Test(event, traceparent_child_keeps_trace_and_changes_span) {
  const char *parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  cr_assert(qm_traceparent_valid(parent));
  char child[64];
  qm_traceparent_child(parent, child, sizeof(child));
  cr_assert(qm_traceparent_valid(child), "%s", child);
  cr_assert_eq(strncmp(child, parent, 35), 0);
  cr_assert_neq(strncmp(child + 36, parent + 36, 16), 0);
  char fresh[64];
  qm_traceparent_child("garbage", fresh, sizeof(fresh));
  cr_assert(qm_traceparent_valid(fresh));
  cr_assert_not(qm_traceparent_valid("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
  char tid[40];
  qm_traceparent_trace_id(parent, tid, sizeof(tid));
  cr_assert_str_eq(tid, "4bf92f3577b34da6a3ce929d0e0e4736");
}

Test(event, meta_init_fills_cloudevents_attributes) {
  qm_event_meta_t m;
  qm_event_meta_init(&m, "intake", "qm.request.submitted.v1", "r-1", NULL);
  cr_assert(qm_uuid_valid(m.id));
  cr_assert_str_eq(m.source, "/qm/intake");
  cr_assert_str_eq(m.type, "qm.request.submitted.v1");
  cr_assert_str_eq(m.subject, "r-1");
  cr_assert_str_eq(m.content_type, "application/protobuf");
  cr_assert(qm_traceparent_valid(m.traceparent));
  cr_assert(m.time_ms > 1700000000000LL);
}
