/*
 * test_recorder: the harness's HTTP recorder itself (no stack), since the
 * tests of webhooks, procurement and carriers rely on what it records.
 */
#include "harness.h"

#include <criterion/criterion.h>
#include <string.h>

Test(recorder, records_and_answers_as_configured) {
  it_recorder_t *r = it_recorder_start();
  cr_assert(it_recorder_port(r) > 0);
  char *out = NULL;
  char url[256];
  snprintf(url, sizeof(url), "%s/hooks/a?x=1", it_recorder_url(r));
  const char *post[] = {"/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                        "-H", "X-Sig: abc", "-d", "{\"n\":1}", url, NULL};
  cr_assert_eq(it_run(post, NULL, 10000, &out, NULL), 0);
  cr_assert_str_eq(out, "200");
  free(out);

  it_recorder_set_response(r, "/po", 503, "{\"error\":\"down\"}");
  snprintf(url, sizeof(url), "%s/po/1", it_recorder_url(r));
  const char *get[] = {"/usr/bin/curl", "-s", "-w", " %{http_code}", url, NULL};
  cr_assert_eq(it_run(get, NULL, 10000, &out, NULL), 0);
  cr_assert_str_eq(out, "{\"error\":\"down\"} 503");
  free(out);

  cr_assert(it_recorder_wait(r, NULL, 2, 5000));
  cr_assert_eq(it_recorder_count(r, "/hooks"), 1);
  cr_assert_eq(it_recorder_count(r, "/po"), 1);
  char *body = it_recorder_body(r, "/hooks", 0);
  cr_assert_str_eq(body, "{\"n\":1}");
  free(body);
  json_t *reqs = it_recorder_requests(r, "/hooks");
  json_t *first = json_array_get(reqs, 0);
  cr_assert_str_eq(json_string_value(json_object_get(first, "method")), "POST");
  cr_assert_str_eq(json_string_value(json_object_get(first, "path")), "/hooks/a?x=1");
  cr_assert_str_eq(
      json_string_value(json_object_get(json_object_get(first, "headers"), "x-sig")), "abc");
  json_decref(reqs);

  /* A hanging peer: a client with a 1 s timeout gives up. */
  it_recorder_set_delay_ms(r, 3000);
  const char *slow[] = {"/usr/bin/curl", "-s", "-m", "1", url, NULL};
  cr_assert_neq(it_run(slow, NULL, 10000, &out, NULL), 0);
  free(out);
  it_recorder_set_delay_ms(r, 0);
  cr_assert_not(it_recorder_wait(r, "/nothing", 1, 200));
  it_recorder_clear(r);
  cr_assert_eq(it_recorder_count(r, NULL), 0);
  it_recorder_stop(r);
}
