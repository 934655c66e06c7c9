# gunicorn -c gunicorn.conf.py: no reload hooks needed, the Django app does the watching.
wsgi_app = "mysite.wsgi:application"
bind = "127.0.0.1:8000"
workers = 2
