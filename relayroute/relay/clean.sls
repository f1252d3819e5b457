# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes exactly what relayroute added on a relay: its chains, rules, routes,
# kernel parameters (earlier values put back), restore script, boot unit and watcher
# (the watcher stopped first).
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import relayroute with context %}
{%- set persist = relayroute.config.persist %}

relayroute-relay-policy-routing-clean:
  relayroute.relay_absent:
    - backend: {{ relayroute.config.backend }}
    - persist: {{ persist | json }}
    - watcher: {{ relayroute.config.watch | json }}
