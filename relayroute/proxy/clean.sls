# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes what relayroute added on a master-relay: the TPROXY divert (chains,
# rule, local route) and its sysctl drop-in. HAProxy's package and configuration
# stay: removing them would stop the mail service, which is the operator's call.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import relayroute with context %}

relayroute-proxy-tproxy-divert-clean:
  relayroute.proxy_absent: []

relayroute-proxy-sysctl-config-clean:
  file.absent:
    - name: {{ relayroute.config.proxy.sysctl_config }}
